"""Per-slice metrics of one model on the held-out eval set.

For every record: the negative log-likelihood of the reference answer (one batched forward
pass, no generation) and a greedy answer (batched generation). Per slice:
  nll, perplexity                 every slice
  exact_match, token_f1           every slice (normalised text)
  accuracy, macro_f1, confusion   classification slices (the answer must be one of the labels)
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from typing import Any

from tuneloop.config import EvaluateConfig

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    return re.sub(r"\s+", " ", s.lower().translate(_PUNCT)).strip()


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def macro_f1(preds: list[str], refs: list[str], labels: list[str]) -> float:
    f1s = []
    for lab in labels:
        tp = sum(p == lab and r == lab for p, r in zip(preds, refs, strict=True))
        fp = sum(p == lab and r != lab for p, r in zip(preds, refs, strict=True))
        fn = sum(p != lab and r == lab for p, r in zip(preds, refs, strict=True))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


def score_records(model: Any, tok: Any, records: list[dict[str, Any]], batch_size: int,
                  max_new_tokens: int) -> list[dict[str, Any]]:
    """Reference NLL and a greedy answer for each record (prompt/completion/response fields)."""
    import torch

    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        prompts = [r["prompt"] for r in batch]
        # NLL of the reference completion: left-padded prompt+completion, loss on completion tokens only.
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        c_ids = tok([r["completion"] for r in batch], add_special_tokens=False)["input_ids"]
        seqs = [p + c for p, c in zip(p_ids, c_ids, strict=True)]
        width = max(map(len, seqs))
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
        attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        labels = torch.tensor([[-100] * (width - len(c)) + c for c in c_ids], device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attn).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = labels[:, 1:]
            mask = tgt != -100
            tok_lp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            nll_sum = (-tok_lp.sum(-1)).tolist()
            n_tok = mask.sum(-1).tolist()
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for r, a, s, n in zip(batch, answers, nll_sum, n_tok, strict=True):
            out.append({"id": r["id"], "slice": r["slice"], "prediction": a.strip(), "reference": r["response"],
                        "nll_sum": s, "n_tokens": n})
    return out


def slice_metrics(scored: list[dict[str, Any]], cfg: EvaluateConfig) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in scored:
        groups[s["slice"]].append(s)
        groups["all"].append(s)
    result: dict[str, dict[str, Any]] = {}
    for name, rows in groups.items():
        tokens = sum(r["n_tokens"] for r in rows)
        nll = sum(r["nll_sum"] for r in rows) / max(tokens, 1)
        em = [float(normalize_answer(r["prediction"]) == normalize_answer(r["reference"])) for r in rows]
        m: dict[str, Any] = {
            "n": len(rows), "nll": nll, "perplexity": math.exp(min(nll, 50.0)),
            "exact_match": sum(em) / len(rows),
            "token_f1": sum(token_f1(r["prediction"], r["reference"]) for r in rows) / len(rows),
            "per_record_exact_match": em,
        }
        sl = cfg.slices.get(name)
        if sl is not None and sl.task == "classification":
            preds = [normalize_answer(r["prediction"]) for r in rows]
            refs = [normalize_answer(r["reference"]) for r in rows]
            labels = [normalize_answer(lab) for lab in sl.labels]
            m["accuracy"] = sum(p == r for p, r in zip(preds, refs, strict=True)) / len(rows)
            m["macro_f1"] = macro_f1(preds, refs, labels)
            cats = [*labels, "(other)"]  # (other): an answer that is none of the labels
            pred_cat = [p if p in labels else "(other)" for p in preds]
            m["confusion"] = {"labels": cats,  # rows: reference, columns: prediction (square, as KFP wants)
                              "matrix": [[sum(r == t and p == q for p, r in zip(pred_cat, refs, strict=True))
                                          for q in cats] for t in cats]}
        result[name] = m
    return result
