"""Chat formatting with the base model's own tokenizer and chat template.

Records leave ingest as plain strings: `prompt` is the conversation rendered by the model's
chat template up to the assistant turn, `completion` the answer plus the end-of-turn token.
Training (TRL prompt/completion, loss on the completion only), evaluation and serving all use
the same rendering, so there is one place where a prompt becomes tokens.
"""

from __future__ import annotations

from typing import Any


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
