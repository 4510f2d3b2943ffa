"""Chat formatting with the base model's own tokenizer and chat template.

Records leave ingest as plain strings: `prompt` is the conversation rendered by the model's
chat template up to the assistant turn, `completion` the answer plus the end-of-turn token.
Training (TRL prompt/completion, loss on the completion only), evaluation and serving all use
the same rendering, so there is one place where a prompt becomes tokens. The length of a
training sequence (prompt + answer, in tokens: what train.*.max_length bounds) is counted here
too (`count_tokens`), by ingest's length policy and by validate_data alike; `ChatFormatter.fit`
cuts a prompt from the left until the sequence fits, keeping the whole answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_FIT_TRIES = 8  # re-tokenizing after a cut can differ by a token or two at the seams: cut again


class TokenizerMismatch(ValueError):
    """The tokenizer does not belong to the model it is meant to format for."""


def check_tokenizer(tokenizer: Any, model_config: Any, where: str) -> None:
    """Refuse a tokenizer whose vocabulary or special tokens cannot fit the model."""
    n = len(tokenizer)
    if n > model_config.vocab_size:
        raise TokenizerMismatch(f"{where}: tokenizer has {n} tokens, model vocabulary is {model_config.vocab_size}")
    if tokenizer.eos_token is None:
        raise TokenizerMismatch(f"{where}: tokenizer has no eos_token; cannot end an assistant turn")
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerMismatch(f"{where}: tokenizer has no chat template")
    eos_ids = model_config.eos_token_id if isinstance(model_config.eos_token_id, list) \
        else [model_config.eos_token_id]
    if model_config.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        raise TokenizerMismatch(f"{where}: tokenizer eos id {tokenizer.eos_token_id} is not the model's "
                                f"eos id {model_config.eos_token_id}")


def ensure_pad_token(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Tokens of each text as training sees a rendered sequence (its special tokens are in the text)."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@dataclass
class Fit:
    """A conversation that fits max_length (`turns`), or None where it does not (and may not be cut, or
    even the answer alone does not fit)."""

    turns: list[dict[str, str]] | None
    tokens: int | None  # the longest sequence (prompt + an answer) as it came; None: short enough uncounted
    fitted_tokens: int | None  # ... once fitted (the answer with the least prompt, where that does not fit)
    cut: bool  # the prompt was shortened


class ChatFormatter:
    """Renders prompts and completions with one tokenizer's chat template."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    def prompt(self, messages: list[dict[str, str]]) -> str:
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def completion(self, text: str) -> str:
        return text.strip() + self.tokenizer.eos_token

    def user_prompt(self, text: str) -> str:
        return self.prompt([{"role": "user", "content": text}])

    def seq_tokens(self, turns: list[dict[str, str]], completions: list[str]) -> int:
        """Tokens of the longest training sequence: the rendered prompt + each rendered completion."""
        prompt = self.prompt(turns)
        return max(count_tokens(self.tokenizer, [prompt + c for c in completions]))

    def fit(self, turns: list[dict[str, str]], completions: list[str], max_length: int,
            body: tuple[str, str] | None = None, cut: bool = True) -> Fit:
        """Shorten the prompt from the left until prompt + every completion fits `max_length` tokens:
        drop the oldest turns (system turns stay) while more than one remains, then cut the start of the
        last turn's text. `body` = (prefix, suffix) of the last turn that must stay (a classification
        template's instruction around its field); only the text between them is cut. Returns Fit with
        turns None when it does not fit and `cut` is False, or the answer does not fit even with nothing
        of that text left. A sequence of fewer UTF-8 bytes than max_length is not tokenized: a token
        covers at least one byte (bar one leading prefix-space token)."""
        prompt = self.prompt(turns)
        if max(len((prompt + c).encode()) for c in completions) < max_length:
            return Fit(turns, None, None, False)
        n0 = n = max(count_tokens(self.tokenizer, [prompt + c for c in completions]))
        if n <= max_length:
            return Fit(turns, n, n, False)
        if not cut:
            return Fit(None, n, n, False)
        ts = list(turns)
        while n > max_length and sum(t["role"] != "system" for t in ts) > 1:
            first = next(i for i, t in enumerate(ts) if t["role"] != "system")
            del ts[first]
            while sum(t["role"] != "system" for t in ts) > 1 and \
                    next(t for t in ts if t["role"] != "system")["role"] != "user":
                del ts[next(i for i, t in enumerate(ts) if t["role"] != "system")]  # start on a user turn
            n = self.seq_tokens(ts, completions)
        if n <= max_length:
            return Fit(ts, n0, n, True)
        last = ts[-1]["content"]
        prefix, suffix = body if body and last.startswith(body[0]) and last.endswith(body[1]) \
            and len(last) >= len(body[0]) + len(body[1]) else ("", "")
        text = last[len(prefix):len(last) - len(suffix)]

        def with_text(s: str) -> list[dict[str, str]]:
            return [*ts[:-1], {**ts[-1], "content": prefix + s + suffix}]

        floor = self.seq_tokens(with_text(""), completions)
        if floor >= max_length:
            return Fit(None, n0, floor, True)
        for _ in range(_FIT_TRIES):
            text = self._cut_left(text, n - max_length).lstrip()
            if not text:
                break
            n = self.seq_tokens(with_text(text), completions)
            if n <= max_length:
                return Fit(with_text(text), n0, n, True)
        return Fit(None, n0, floor, True)

    def _cut_left(self, text: str, tokens: int) -> str:
        """`text` without (at least) its first `tokens` tokens, cut at a token boundary where the
        tokenizer gives offsets, else in proportion to the characters."""
        try:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, ValueError, KeyError, TypeError):
            offsets = None
        if offsets:
            at = offsets[tokens][0] if tokens < len(offsets) else len(text)
        else:
            n = max(count_tokens(self.tokenizer, [text])[0], 1)
            at = len(text) - (len(text) * (n - tokens) // n if tokens < n else 0)
        if 0 < at < len(text) and not text[at - 1].isspace():  # start on a word, not inside one
            space = next((i for i in range(at, min(at + 30, len(text))) if text[i].isspace()), at)
            at = space
        return text[at:]
