"""Merge the candidate's LoRA adapter with the champion's (peft `add_weighted_adapter`), choosing the
merge on a tuning split that is never the gate's evaluation data.

Methods (`train.merge.methods`), each with every (candidate, champion) weight pair of `train.merge.weights`:
    linear     w_c * dW_c + w_h * dW_h, exactly: peft's `cat` (the factors are stacked, so the merged
               adapter has rank r_c + r_h). peft's own `linear` mixes the A and B factors separately,
               which for two independently trained adapters adds cross terms B_c A_h (peft calls it "a
               very rough approximation").
    ties       TIES-merging (Yadav et al. 2023: keep the largest `density` share of each delta, elect the
               sign per value, average the values that agree) on the full weight deltas dW = s * B A, then
               SVD back to rank r_c + r_h: peft's `ties_svd`.
    dare_ties  DARE (Yu et al. 2024: drop values at random to `density`, rescale the rest) then TIES, on the
               full deltas, SVD back to rank r_c + r_h: peft's `dare_ties_svd` (seeded: `train.merge.seed`).

The tuning split (make_tuning_split): records of the training data of this run and of the champion
(ingest's sft.jsonl files: the new slices and the old ones) whose id hashes below `tuning_share`
(sha256 of "tuneloop-merge-tuning", the id: the same records on every run), at most
`tuning_max_per_slice` per slice (the smallest hashes). A record that shares its id or its prompt
(normalised text, sha256) with any record of the gate's evaluation set is never in it; the split
is built from the evaluation set's fingerprints (eval_fingerprints), never its texts, and
`assert_disjoint` proves the result. Selection (select_merge) receives only the tuning file: it
cannot read the gate's records, so the gate stays an honest held-out test.

Selection: every merge and both parents are scored by the mean answer-token NLL per slice of the
tuning split; the reference of a slice is the better parent on it (min of candidate and champion),
and the merge with the smallest worst-slice regret (max over slices of NLL - reference) wins, ties
broken by the mean NLL over slices. That is the gate's question (no slice may get worse) asked on
data the gate never sees. The tuning records are training records of one parent or the other, so
the parents' NLL there is optimistic; every merge is measured on the same records, so the
comparison between merges is fair, and the gate decides on held-out data afterwards.

This module is below evaluate/ in the house's layers, so it scores with its own few lines (tuning_nll)
instead of evaluate/scoring.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.config.train import MergeConfig
from tuneloop.jsonl import iter_jsonl, read_jsonl, write_jsonl

log = logging.getLogger("tuneloop.train.merge")

TUNING_SEED = "tuneloop-merge-tuning"
PEFT_METHOD = {"linear": "cat", "ties": "ties_svd", "dare_ties": "dare_ties_svd"}
_WS = re.compile(r"\s+")


class TuningOverlap(AssertionError):
    """A tuning record shares an id or a prompt with an evaluation record."""


# -- the tuning split ----------------------------------------------------------------------------------
def _hash01(rid: Any) -> float:
    d = hashlib.sha256(f"{TUNING_SEED}\0{rid}".encode()).digest()
    return int.from_bytes(d[:8], "big") / 2 ** 64


def record_text(r: dict[str, Any]) -> str:
    """The prompt a record is recognised by: its plain user text (ingest's `user_text`), else `prompt`."""
    return str(r.get("user_text") or r.get("prompt") or "")


def content_hash(r: dict[str, Any]) -> str:
    """sha256 of the record's prompt, lower-cased with whitespace collapsed (an answer does not make a
    prompt the gate asks a different question)."""
    return hashlib.sha256(_WS.sub(" ", record_text(r)).strip().lower().encode()).hexdigest()


@dataclass(frozen=True)
class Fingerprints:
    """What the tuning split needs to know about the evaluation set: ids and prompt hashes, no texts."""

    ids: frozenset[str]
    contents: frozenset[str]


def eval_fingerprints(records: Iterable[dict[str, Any]]) -> Fingerprints:
    rows = list(records)
    return Fingerprints(frozenset(str(r.get("id")) for r in rows), frozenset(content_hash(r) for r in rows))


def make_tuning_split(train_files: list[Path], evaluation: Fingerprints, share: float,
                      max_per_slice: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(tuning records, report): see the module docstring. `train_files` are ingest sft.jsonl files (this
    run's, the champion's); a missing file is skipped and named in the report."""
    chosen: dict[str, tuple[float, dict[str, Any]]] = {}
    seen_content: set[str] = set()
    report: dict[str, Any] = {"share": share, "max_per_slice": max_per_slice, "seed": TUNING_SEED, "files": {},
                              "excluded_eval_id": 0, "excluded_eval_prompt": 0, "excluded_duplicate": 0}
    for path in train_files:
        path = Path(path)
        if not path.exists():
            report["files"][str(path)] = "missing"
            continue
        n = 0
        for r in iter_jsonl(path):
            rid = str(r.get("id"))
            h = _hash01(rid)
            if h >= share:
                continue
            if rid in evaluation.ids:
                report["excluded_eval_id"] += 1
                continue
            c = content_hash(r)
            if c in evaluation.contents:
                report["excluded_eval_prompt"] += 1
                continue
            if rid in chosen or c in seen_content:
                report["excluded_duplicate"] += 1
                continue
            seen_content.add(c)
            chosen[rid] = (h, {**r, "tuning_source": str(path)})
            n += 1
        report["files"][str(path)] = n
    per_slice: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
    for h, r in chosen.values():
        per_slice[str(r.get("slice") or "default")].append((h, r))
    out: list[dict[str, Any]] = []
    for sl in sorted(per_slice):
        out += [r for _, r in sorted(per_slice[sl], key=lambda x: x[0])[:max_per_slice]]
    report["per_slice"] = {sl: min(len(v), max_per_slice) for sl, v in sorted(per_slice.items())}
    report["records"] = len(out)
    assert_disjoint(out, evaluation)
    return out, report


def assert_disjoint(tuning: Iterable[dict[str, Any]], evaluation: Fingerprints) -> dict[str, int]:
    """Prove that no tuning record shares an id or a prompt hash with the evaluation set; raises
    TuningOverlap naming the first offenders. Returns the counts checked."""
    rows = list(tuning)
    by_id = sorted(str(r.get("id")) for r in rows if str(r.get("id")) in evaluation.ids)
    by_content = sorted(str(r.get("id")) for r in rows if content_hash(r) in evaluation.contents)
    if by_id or by_content:
        raise TuningOverlap(f"tuning split overlaps the evaluation set: ids {by_id[:5]}, same prompt {by_content[:5]}")
    return {"tuning": len(rows), "eval_ids": len(evaluation.ids), "eval_prompts": len(evaluation.contents),
            "overlap_id": 0, "overlap_prompt": 0}


def write_tuning_split(train_files: list[Path], eval_path: Path, out: Path, cfg: MergeConfig) -> Path:
    """Build the split from the training files and the evaluation set's fingerprints; writes
    out/tuning.jsonl and out/tuning_report.json (with the disjointness proof). Returns the jsonl path."""
    fp = eval_fingerprints(iter_jsonl(eval_path))
    records, report = make_tuning_split(train_files, fp, cfg.tuning_share, cfg.tuning_max_per_slice)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "tuning.jsonl", records)
    report["disjoint"] = assert_disjoint(read_jsonl(out / "tuning.jsonl"), fp)
    (out / "tuning_report.json").write_text(json.dumps(report, indent=2))
    return out / "tuning.jsonl"


# -- scoring -------------------------------------------------------------------------------------------
def tuning_nll(model: Any, tok: Any, records: list[dict[str, Any]], batch_size: int = 8) -> dict[str, float]:
    """Mean answer-token NLL per slice (chat-formatted `prompt` / `completion`), one forward pass per batch."""
    import torch

    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.eval()
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        p_ids = tok([r["prompt"] for r in batch], add_special_tokens=False)["input_ids"]
        c_ids = tok([r["completion"] for r in batch], add_special_tokens=False)["input_ids"]
        seqs = [p + c for p, c in zip(p_ids, c_ids, strict=True)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        labels = torch.tensor([[-100] * len(p) + c + [-100] * (width - len(p) - len(c))
                               for p, c in zip(p_ids, c_ids, strict=True)], device=device)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float()[:, :-1], dim=-1)
        tgt = labels[:, 1:]
        mask = tgt != -100
        nll = -(logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask)
        for r, s, n in zip(batch, nll.sum(-1).tolist(), mask.sum(-1).tolist(), strict=True):
            sl = str(r.get("slice") or "default")
            sums[sl] += s
            counts[sl] += n
    return {sl: sums[sl] / max(counts[sl], 1) for sl in sorted(sums)}


Scorer = Callable[[Any, Any, list[dict[str, Any]]], dict[str, float]]


# -- merging -------------------------------------------------------------------------------------------
def _adapter_rank(adapter: Path) -> int:
    return int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])


def _load_pair(base_dir: Path, candidate: Path, champion: Path) -> tuple[Any, Any]:
    """The base model with both adapters loaded (named `candidate` and `champion`), and its tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    if torch.cuda.is_available():
        base = base.to("cuda")
    model = PeftModel.from_pretrained(base, str(candidate), adapter_name="candidate")
    model.load_adapter(str(champion), adapter_name="champion")
    model.eval()
    return model, tok


def _add_merge(model: Any, name: str, method: str, weights: tuple[float, float], density: float, rank: int,
               seed: int) -> None:
    import torch

    torch.manual_seed(seed)  # DARE drops at random
    kw: dict[str, Any] = {}
    if method != "linear":
        kw.update(density=density, svd_rank=rank)
    model.add_weighted_adapter(["candidate", "champion"], list(weights), name, combination_type=PEFT_METHOD[method],
                               **kw)


@dataclass
class MergeTrial:
    method: str
    weights: tuple[float, float]  # (candidate, champion)
    nll: dict[str, float]
    regret: float  # worst slice: NLL - the better parent's NLL
    mean_nll: float

    @property
    def name(self) -> str:
        return f"{self.method} {self.weights[0]:g}/{self.weights[1]:g}"


@dataclass
class MergeSelection:
    adapter: Path
    best: MergeTrial
    parents: dict[str, dict[str, float]]
    trials: list[MergeTrial] = field(default_factory=list)
    tuning_records: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"adapter": str(self.adapter), "best": asdict(self.best), "parents": self.parents,
                "trials": [asdict(t) for t in self.trials], "tuning_records": self.tuning_records,
                "criterion": "min over merges of max over tuning slices of (NLL - min(candidate NLL, champion NLL)); "
                             "ties: mean NLL"}


def select_merge(base_dir: Path, candidate: Path, champion: Path, tuning_path: Path, cfg: MergeConfig, out: Path,
                 scorer: Scorer | None = None) -> MergeSelection:
    """Try every method x weight pair of `cfg`, score each on the tuning split only, keep the best merge as
    out/adapter (a LoRA adapter folder the evaluation reads like any other) and out/selection.json."""
    records = read_jsonl(Path(tuning_path))
    if not records:
        raise ValueError(f"{tuning_path}: the tuning split is empty; no merge can be chosen")
    score = scorer or tuning_nll
    model, tok = _load_pair(Path(base_dir), Path(candidate), Path(champion))
    rank = _adapter_rank(candidate) + _adapter_rank(champion)
    parents = {}
    for who in ("candidate", "champion"):
        model.set_adapter(who)
        parents[who] = score(model, tok, records)
    slices = sorted(set(parents["candidate"]) | set(parents["champion"]))
    ref = {sl: min(p.get(sl, float("inf")) for p in parents.values()) for sl in slices}
    trials: list[MergeTrial] = []
    for method in cfg.methods:
        for w in cfg.weights:
            name = f"trial_{len(trials)}"
            _add_merge(model, name, method, tuple(w), cfg.density, rank, cfg.seed)
            model.set_adapter(name)
            nll = score(model, tok, records)
            trials.append(MergeTrial(method, (float(w[0]), float(w[1])), nll,
                                     max(nll[sl] - ref[sl] for sl in slices),
                                     sum(nll[sl] for sl in slices) / len(slices)))
            model.set_adapter("candidate")
            model.delete_adapter(name)
            log.info("merge %s: worst-slice regret %+.4f, mean NLL %.4f", trials[-1].name, trials[-1].regret,
                     trials[-1].mean_nll)
    best = min(trials, key=lambda t: (t.regret, t.mean_nll))
    out.mkdir(parents=True, exist_ok=True)
    adapter = save_merge(model, best.method, best.weights, cfg.density, rank, cfg.seed, out / "adapter")
    del model
    sel = MergeSelection(adapter, best, parents, trials, len(records))
    (out / "selection.json").write_text(json.dumps(sel.as_dict(), indent=2))
    return sel


def save_merge(model: Any, method: str, weights: tuple[float, float], density: float, rank: int, seed: int,
               out: Path) -> Path:
    """Build one merge on a model holding `candidate` and `champion` and save it as a plain adapter folder."""
    _add_merge(model, "merged", method, weights, density, rank, seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=["merged"])
    src = tmp / "merged" if (tmp / "merged" / "adapter_config.json").exists() else tmp
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(str(src), str(out))
    shutil.rmtree(tmp, ignore_errors=True)
    info = {"merge": {"method": method, "peft_combination_type": PEFT_METHOD[method], "weights": list(weights),
                      "density": density if method != "linear" else None, "rank": rank, "seed": seed}}
    (out / "merge.json").write_text(json.dumps(info, indent=2))
    return out


def merge_with_champion(base_dir: Path, candidate: Path, champion: Path, train_files: list[Path], eval_path: Path,
                        cfg: MergeConfig, out: Path, scorer: Scorer | None = None) -> MergeSelection:
    """The whole mitigation: the tuning split (from the training files and the evaluation set's fingerprints),
    then the selection on it alone. out/tuning.jsonl, out/tuning_report.json, out/selection.json, out/adapter."""
    tuning = write_tuning_split(train_files, eval_path, out, cfg)
    return select_merge(base_dir, candidate, champion, tuning, cfg, out, scorer)
