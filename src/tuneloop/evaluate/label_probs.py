"""The probability a model gives each label of a classification slice.

A softmax over the summed log-likelihood of each label's completion - the label and the end-of-turn
token, as the model was trained to answer (ChatFormatter.completion) - given the chat-formatted
prompt: the model's own distribution restricted to the slice's labels. One function for the three
places that need it: evaluation (the calibration reference stored with a registered version,
evaluate/calibration.py), the monitor (production prompts the gateway recorded none for) and the
gateway (recording them per request).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tuneloop.evaluate.scoring import completion_logprobs


def label_probability_batch(model: Any, tok: Any, prompts: list[str], labels: list[str],
                            batch_size: int) -> list[dict[str, float]]:
    """{label: p} for each chat-formatted prompt (prompt x label pairs scored in batches of `batch_size`)."""
    eos = tok.eos_token or ""
    completions = [lab.strip() + eos for lab in labels]
    k = len(labels)
    lps = completion_logprobs(model, tok, [p for p in prompts for _ in labels], completions * len(prompts),
                              batch_size, "label probabilities")
    out = []
    for i in range(len(prompts)):
        lp = np.array([lps[i * k + j][0] for j in range(k)])
        e = np.exp(lp - lp.max())
        out.append({lab: float(v) for lab, v in zip(labels, e / e.sum(), strict=True)})
    return out


def label_probabilities(model: Any, tokenizer: Any, prompt: str, labels: list[str]) -> dict[str, float]:
    """{label: p} for one chat-formatted prompt."""
    return label_probability_batch(model, tokenizer, [prompt], labels, batch_size=len(labels))[0]


def add_label_probs(model: Any, tok: Any, records: list[dict[str, Any]], scored: list[dict[str, Any]],
                    labels: dict[str, list[str]], batch_size: int) -> list[dict[str, Any]]:
    """Put `label_probs` on the scored rows (score_records' output, same order as `records`) of the
    classification slices in `labels` ({slice: its labels}); returns `scored`."""
    for sl, labs in labels.items():
        idx = [i for i, r in enumerate(records) if r["slice"] == sl]
        probs = label_probability_batch(model, tok, [records[i]["prompt"] for i in idx], labs, batch_size)
        for i, p in zip(idx, probs, strict=True):
            scored[i]["label_probs"] = p
    return scored
