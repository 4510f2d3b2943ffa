"""Running a model over evaluation inputs, batched: completion log-likelihoods and greedy answers.

Prompts are already chat-template-rendered strings (ingest did it). Padding is on the left so
batched generation and scoring line up; the prompt is encoded once per batch and reused for
the likelihood pass and the generation pass. evaluate/label_probs.py builds the probability a
model gives each label of a classification slice on `completion_logprobs`.
"""

from __future__ import annotations

from typing import Any

from tuneloop.progress import Progress


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def completion_logprobs(model: Any, tok: Any, prompts: list[str], completions: list[str],
                        batch_size: int, what: str = "likelihoods") -> list[tuple[float, int]]:
    """(sum of log p(completion token), completion token count) for each prompt/completion pair."""
    import torch

    out: list[tuple[float, int]] = []
    progress = Progress(what, len(prompts))
    for i in range(0, len(prompts), batch_size):
        p_ids = tok(prompts[i:i + batch_size], add_special_tokens=False)["input_ids"]
        c_ids = tok(completions[i:i + batch_size], add_special_tokens=False)["input_ids"]
        seqs = [p + c for p, c in zip(p_ids, c_ids, strict=True)]
        width = max(map(len, seqs))
        pad = tok.pad_token_id
        dev = _device(model)
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=dev)
        attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=dev)
        labels = torch.tensor([[-100] * (width - len(c)) + c for c in c_ids], device=dev)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attn).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = labels[:, 1:]
            mask = tgt != -100
            tok_lp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        out += list(zip(tok_lp.sum(-1).tolist(), mask.sum(-1).tolist(), strict=True))
        progress.update(len(seqs))
    return out


def generate(model: Any, tok: Any, prompts: list[str], batch_size: int, max_new_tokens: int,
             what: str = "answers") -> list[str]:
    """Greedy answers, batched (left padding), stopping at the end-of-turn token."""
    import torch

    answers: list[str] = []
    progress = Progress(what, len(prompts))
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(_device(model))
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers += [a.strip() for a in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
        progress.update(gen.shape[0])
    return answers


def score_records(model: Any, tok: Any, records: list[dict[str, Any]], batch_size: int,
                  max_new_tokens: int, what: str = "evaluate") -> list[dict[str, Any]]:
    """Reference NLL and a greedy answer for each eval record (prompt/completion/response fields)."""
    prompts = [r["prompt"] for r in records]
    lps = completion_logprobs(model, tok, prompts, [r["completion"] for r in records], batch_size,
                              f"{what} likelihoods")
    answers = generate(model, tok, prompts, batch_size, max_new_tokens, f"{what} answers")
    return [{"id": r["id"], "slice": r["slice"], "prompt": r.get("user_text", ""), "prediction": a,
             "reference": r["response"],
             "nll_sum": -lp, "n_tokens": n} for r, a, (lp, n) in zip(records, answers, lps, strict=True)]


def preference_margins(model: Any, tok: Any, pairs: list[dict[str, Any]], batch_size: int,
                       what: str = "preference") -> list[float]:
    """log p(chosen) - log p(rejected) per held-out pair: the model's implicit preference."""
    prompts = [p["prompt"] for p in pairs]
    chosen = completion_logprobs(model, tok, prompts, [p["chosen"] for p in pairs], batch_size, f"{what} chosen")
    rejected = completion_logprobs(model, tok, prompts, [p["rejected"] for p in pairs], batch_size,
                                   f"{what} rejected")
    return [c[0] - r[0] for c, r in zip(chosen, rejected, strict=True)]
