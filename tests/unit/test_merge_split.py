"""Forgetting repair, the pieces that need no training: the merge's tuning split never touches the
gate's records and selection never reads the gate's file (train/merge.py); the repair ladder's logic
with fake attempts (repair.py); EWC's split of the penalty over ZeRO-3 partitions (train/ewc.py)."""

from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tuneloop.config.train import MergeConfig

pytestmark = [pytest.mark.unit, pytest.mark.forgetting]


# -- the tuning split ------------------------------------------------------------------------------------
def _rec(rid: str, prompt: str, answer: str, sl: str) -> dict[str, Any]:
    return {"id": rid, "slice": sl, "user_text": prompt, "response": answer, "prompt": f"<u>{prompt}</u>",
            "completion": f"{answer}<end>"}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def split_files(tmp_path: Path) -> dict[str, Path]:
    evals = [_rec(f"ev-{i}", f"eval question number {i}?", "yes", "old" if i % 2 else "new") for i in range(40)]
    run = [_rec(f"run-{i}", f"new question {i}", "a", "new") for i in range(60)]
    champ = [_rec(f"ch-{i}", f"old ticket {i}", "billing", "old") for i in range(60)]
    # planted overlaps: an eval id reused, and eval prompts in other case and spacing under new ids
    run += [_rec("ev-3", "a different prompt", "a", "new")]
    champ += [_rec(f"leak-{i}", f"  EVAL question   number {i}? ", "billing", "old") for i in range(20)]
    return {"eval": _write(tmp_path / "eval.jsonl", evals), "run": _write(tmp_path / "run" / "sft.jsonl", run),
            "champion": _write(tmp_path / "champ" / "sft.jsonl", champ)}


def test_tuning_split_never_overlaps_the_gate_records(split_files: dict[str, Path], tmp_path: Path) -> None:
    from tuneloop.jsonl import read_jsonl
    from tuneloop.train.merge import (TuningOverlap, assert_disjoint, content_hash, eval_fingerprints,
                                      make_tuning_split, write_tuning_split)

    evals = read_jsonl(split_files["eval"])
    fp = eval_fingerprints(evals)
    tuning, report = make_tuning_split([split_files["run"], split_files["champion"]], fp, 0.95, 1000)
    assert tuning and {r["slice"] for r in tuning} == {"old", "new"}  # both parents' slices are there
    assert report["excluded_eval_id"] >= 1 or _hash_of("ev-3") >= 0.95
    assert report["excluded_eval_prompt"] > 0  # the planted leaks were seen and kept out
    assert not {r["id"] for r in tuning} & {r["id"] for r in evals}
    assert not {content_hash(r) for r in tuning} & {content_hash(r) for r in evals}
    assert not any(r["id"].startswith("leak-") for r in tuning)
    assert assert_disjoint(tuning, fp)["overlap_id"] == 0
    with pytest.raises(TuningOverlap, match="ev-1"):
        assert_disjoint([*tuning, evals[1]], fp)
    # deterministic, by id hash: the same split from the files in the other order
    again, _ = make_tuning_split([split_files["champion"], split_files["run"]], fp, 0.95, 1000)
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in tuning)
    # the written split carries its proof
    path = write_tuning_split([split_files["run"], split_files["champion"]], split_files["eval"], tmp_path / "t",
                              MergeConfig(tuning_share=0.5, tuning_max_per_slice=10))
    rep = json.loads((path.parent / "tuning_report.json").read_text())
    assert rep["disjoint"]["overlap_id"] == 0 and rep["disjoint"]["overlap_prompt"] == 0
    assert all(n <= 10 for n in rep["per_slice"].values())


def _hash_of(rid: str) -> float:
    from tuneloop.train.merge import _hash01

    return _hash01(rid)


def test_merge_selection_never_reads_the_gate_file(split_files: dict[str, Path], tmp_path: Path,
                                                    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Selection gets the tuning file only; any attempt to open the evaluation file during it fails the test."""
    from tuneloop.jsonl import read_jsonl
    from tuneloop.tiny import build_random_adapter
    from tuneloop.train.merge import select_merge, write_tuning_split

    cand = build_random_adapter(tiny_model_dir, tmp_path / "cand", seed=1, alpha=16)
    champ = build_random_adapter(tiny_model_dir, tmp_path / "champ", seed=2, alpha=16)
    cfg = MergeConfig(methods=["linear", "ties", "dare_ties"], weights=[(1.0, 1.0), (0.3, 0.7)], tuning_share=0.3,
                      tuning_max_per_slice=6)
    tuning = write_tuning_split([split_files["run"], split_files["champion"]], split_files["eval"], tmp_path / "m",
                                cfg)
    guarded = split_files["eval"].resolve()
    opened: list[str] = []

    def guard(opener):  # noqa: ANN001, ANN202
        def wrapped(file, *a, **kw):  # noqa: ANN001, ANN202
            if isinstance(file, (str, bytes, os.PathLike)) and Path(os.fsdecode(file)).resolve() == guarded:
                opened.append(str(file))
                raise PermissionError(f"selection opened the gate's evaluation file {file}")
            return opener(file, *a, **kw)
        return wrapped

    monkeypatch.setattr(builtins, "open", guard(builtins.open))
    monkeypatch.setattr(io, "open", guard(io.open))
    monkeypatch.setattr(os, "open", guard(os.open))
    sel = select_merge(tiny_model_dir, cand, champ, tuning, cfg, tmp_path / "m")
    monkeypatch.undo()
    assert opened == []
    assert len(sel.trials) == 6 and sel.tuning_records == len(read_jsonl(tuning))
    assert sel.best == min(sel.trials, key=lambda t: (t.regret, t.mean_nll))
    assert set(sel.best.nll) == {r["slice"] for r in read_jsonl(tuning)}  # scored on the tuning slices only
    merged = json.loads((sel.adapter / "adapter_config.json").read_text())
    assert merged["r"] == 16  # r_cand + r_champ: linear is exact, ties/dare_ties are SVD'd back to it
    assert json.loads((sel.adapter / "merge.json").read_text())["merge"]["method"] == sel.best.method
    from tuneloop.models import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, sel.adapter)  # a plain adapter folder, as evaluation reads it
    assert model is not None


# -- the repair ladder -----------------------------------------------------------------------------------
@pytest.fixture
def cfg(tmp_path: Path):
    from tuneloop.config import load_config
    from tuneloop.tiny import tiny_run_config

    return load_config(tiny_run_config(tmp_path, Path("/nonexistent-model")))


def _gate(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"passed": all(r["passed"] for r in rules), "reference": "champion v1", "rules": rules}


def _rule(sl: str, passed: bool, kind: str = "max_regression@0.9", change: float = 0.4) -> dict[str, Any]:
    return {"slice": sl, "metric": "nll", "kind": kind, "candidate": 5.0 + change, "champion": 5.0,
            "threshold": 5.1, "ci": [change - 0.05, change + 0.05], "verdict": "pass" if passed else "fail",
            "passed": passed, "why": "..."}


BLOCKED = _gate([_rule("ticket_routing", False), _rule("general_qa", True, change=-0.2)])


class FakeAttempts:
    def __init__(self, passes: set[str], clock: list[float] | None = None, step: float = 0.0,
                 raises: set[str] | None = None) -> None:
        self.passes, self.clock, self.step, self.raises = passes, clock, step, raises or set()
        self.calls: list[tuple[str, Any]] = []

    def __call__(self, name: str, cfg: Any):  # noqa: ANN204
        from tuneloop.repair import AttemptResult

        self.calls.append((name, cfg))
        if self.clock is not None:
            self.clock[0] += self.step
        if name in self.raises:
            raise RuntimeError(f"{name} training crashed\nsecond line")
        ok = name in self.passes
        gate = _gate([_rule("ticket_routing", ok, change=0.02 if ok else 0.3), _rule("general_qa", True)])
        return AttemptResult(gate, {"candidate": {"ticket_routing": {"n": 48, "nll": 5.1}}}, f"/tmp/{name}",
                             {"chosen": "linear 1/1"} if name == "merge" else {})


def test_ladder_tries_mitigations_in_order_and_stops_at_the_first_that_passes(cfg) -> None:
    from tuneloop.repair import TAG_REPAIR, repair

    fake = FakeAttempts(passes={"ewc", "lower_lr"})
    res = repair(cfg, BLOCKED, fake, old_slices=["ticket_routing"])
    assert res.ran and res.passed and res.stopped_by == "passed"
    assert [a.mitigation for a in res.attempts] == ["merge", "replay", "ewc"]  # lower_lr never tried
    assert [n for n, _ in fake.calls] == ["merge", "replay", "ewc"]
    configs = dict(fake.calls)
    assert configs["merge"].train.merge.enabled and not cfg.train.merge.enabled  # the run's own config is untouched
    assert configs["replay"].data.replay_share == cfg.train.repair.replay_share
    assert configs["ewc"].train.sft.init == "champion"
    assert configs["ewc"].train.sft.ewc.lambda_ == cfg.train.repair.ewc_lambda
    assert res.winner.mitigation == "ewc" and res.attempts[0].params["chosen"] == "linear 1/1"
    first = res.attempts[0].slices[0]
    assert first["slice"] == "ticket_routing" and first["ci"] == pytest.approx([0.25, 0.35]) and not first["passed"]
    assert res.attempts[0].metrics["ticket_routing"]["nll"] == 5.1
    assert res.lineage_tags()[TAG_REPAIR] == "ewc"
    md = res.markdown()
    assert "repaired by ewc" in md and md.count("| merge |") == 1 and "CI [+0.2500, +0.3500]" in md


def test_lower_lr_continues_the_champion_at_a_lower_rate(cfg) -> None:
    from tuneloop.repair import mitigation_config

    low, params = mitigation_config("lower_lr", cfg)
    assert low.train.sft.init == "champion"
    assert low.train.sft.learning_rate == pytest.approx(cfg.train.sft.learning_rate * cfg.train.repair.lr_factor)
    assert params["train.sft.learning_rate"] == low.train.sft.learning_rate


def test_mitigations_that_cannot_apply_are_skipped_with_the_reason(cfg) -> None:
    from tuneloop.repair import Skip, mitigation_config

    merged = cfg.model_copy(deep=True)
    merged.train.merge.enabled = True  # the candidate was merged before the gate: merging again counts it twice
    with pytest.raises(Skip, match="train.merge.enabled is on already"):
        mitigation_config("merge", merged)
    assert mitigation_config("replay", merged)[0].train.merge.enabled, "a retrained attempt is merged like the first"
    rl = cfg.model_copy(deep=True)
    rl.train.alignment = "reward+rl"
    with pytest.raises(Skip, match="reward\\+rl"):
        mitigation_config("ewc", rl)
    assert mitigation_config("merge", rl)[0].train.merge.enabled


def test_ladder_budget_by_attempts(cfg) -> None:
    from tuneloop.repair import Budget, repair

    fake = FakeAttempts(passes=set())
    res = repair(cfg, BLOCKED, fake, Budget(max_attempts=2, max_wall_s=1e9), old_slices=["ticket_routing"])
    assert [a.mitigation for a in res.attempts] == ["merge", "replay"] and res.stopped_by == "max_attempts"
    assert not res.passed and "attempt budget" in res.summary()


def test_ladder_budget_by_wall_time(cfg) -> None:
    from tuneloop.repair import Budget, repair

    clock = [0.0]
    fake = FakeAttempts(passes=set(), clock=clock, step=40 * 60.0)  # every attempt takes 40 minutes
    res = repair(cfg, BLOCKED, fake, Budget(max_attempts=10, max_wall_s=60 * 60.0), old_slices=["ticket_routing"],
                 clock=lambda: clock[0])
    # 0 -> 40 min, 40 -> 80 min; the third would start past the hour
    assert [a.mitigation for a in res.attempts] == ["merge", "replay"] and res.stopped_by == "max_wall_minutes"
    assert res.attempts[0].wall_s == pytest.approx(2400) and res.wall_s == pytest.approx(4800)


def test_ladder_config_budget_and_exhaustion(cfg) -> None:
    from tuneloop.repair import repair

    cfg.train.repair.mitigations = ["replay", "merge"]
    fake = FakeAttempts(passes=set())
    res = repair(cfg, BLOCKED, fake, old_slices=["ticket_routing"])
    assert [a.mitigation for a in res.attempts] == ["replay", "merge"] and res.stopped_by == "exhausted"
    assert "every configured mitigation was tried" in res.summary()


@pytest.mark.parametrize("gate,old,why", [
    (_gate([_rule("ticket_routing", False), _rule("ticket_routing", False, kind="min")]), ["ticket_routing"],
     "not regressions"),
    (_gate([_rule("general_qa", False)]), ["ticket_routing"], "this run trained on"),
    (_gate([{"slice": "ticket_routing", "metric": "coverage", "kind": "forgetting", "candidate": None,
             "champion": None, "threshold": None, "passed": False, "why": "no eval records"}]), ["ticket_routing"],
     "not regressions"),
    (_gate([_rule("ticket_routing", True)]), ["ticket_routing"], "nothing to repair"),
])
def test_ladder_does_not_run_unless_only_old_slices_regressed(cfg, gate, old, why) -> None:
    from tuneloop.repair import repair

    fake = FakeAttempts(passes={"merge"})
    res = repair(cfg, gate, fake, old_slices=old)
    assert not res.ran and why in res.reason and fake.calls == [] and not res.passed
    assert "not run" in res.markdown()


def test_ladder_skips_what_cannot_apply_and_survives_a_failed_attempt(cfg) -> None:
    from tuneloop.repair import repair

    cfg.data.replay_share = 0.6  # above train.repair.replay_share: replay is already on
    fake = FakeAttempts(passes={"lower_lr"}, raises={"merge"})
    res = repair(cfg, {"gate": BLOCKED}, fake, old_slices=["ticket_routing"])
    assert "replay" in res.skipped and "already 0.6" in res.skipped["replay"]
    assert [a.mitigation for a in res.attempts] == ["merge", "ewc", "lower_lr"]
    assert res.attempts[0].error == "RuntimeError: merge training crashed" and not res.attempts[0].passed
    assert res.winner.mitigation == "lower_lr"
    none = repair(cfg, BLOCKED, FakeAttempts(passes={"merge"}), old_slices=["ticket_routing"], has_champion=False)
    assert none.ran and none.attempts == [] and set(none.skipped) == {"merge", "replay", "ewc", "lower_lr"}
    cfg.train.repair.enabled = False
    assert "enabled is false" in repair(cfg, BLOCKED, fake, old_slices=["ticket_routing"]).reason


def test_pipeline_attempt_runs_the_stage_functions_and_gates_on_the_first_dataset(cfg, tmp_path: Path) -> None:
    from tuneloop.repair import mitigation_config, pipeline_attempt

    calls: list[tuple] = []
    passed = _gate([_rule("ticket_routing", True, change=0.01)])
    attempt = pipeline_attempt(
        cfg, tmp_path / "dataset", tmp_path / "dpo", tmp_path / "repair",
        ingest=lambda c, o, label: calls.append(("ingest", c.data.replay_share, o, label)),
        sft=lambda c, d, o, label: calls.append(("sft", d, o, c.train.sft.init)),
        align=lambda c, d, s, o, label: calls.append(("align", d, s, o)),
        merge=lambda c, d, cand, o, label: calls.append(("merge", cand, o, label)) or {"params": {"chosen": "ties"}},
        evaluate=lambda c, d, cand, o, label: calls.append(("evaluate", d, cand, o, label)) or {"gate": passed})
    r = attempt("merge", mitigation_config("merge", cfg)[0])
    assert r.passed and r.params == {"chosen": "ties", "dataset": str(tmp_path / "dataset")}
    assert r.candidate == str(tmp_path / "repair/1-merge/merge/adapter")
    assert r.evaluation == str(tmp_path / "repair/1-merge/evaluation")
    assert calls == [("merge", tmp_path / "dpo", tmp_path / "repair/1-merge/merge", "repair/1-merge/merge"),
                     ("evaluate", tmp_path / "dataset", tmp_path / "repair/1-merge/merge",
                      tmp_path / "repair/1-merge/evaluation", "repair/1-merge/evaluate")]
    calls.clear()
    r = attempt("replay", mitigation_config("replay", cfg)[0])  # a new replay share: ingest again, same eval set
    assert [c[0] for c in calls] == ["ingest", "sft", "align", "evaluate"]
    assert calls[0][1] == cfg.train.repair.replay_share and calls[0][3] == "repair/2-replay/ingest"
    assert calls[1][1] == tmp_path / "repair/2-replay/dataset" == Path(r.params["dataset"])
    assert calls[3][1] == tmp_path / "dataset" and calls[3][2] == tmp_path / "repair/2-replay/aligned"
    calls.clear()
    attempt("ewc", mitigation_config("ewc", cfg)[0])  # same data: no ingest
    assert [c[0] for c in calls] == ["sft", "align", "evaluate"] and calls[0][1] == tmp_path / "dataset"
    assert calls[0][3] == "champion"


def test_old_slices() -> None:
    from tuneloop.repair import old_slices

    counts = {"clothing": 950, "electronics": 40, "books": 10}
    assert old_slices(["electronics", "books", "toys", "clothing"], counts, 0.05) == ["books", "electronics", "toys"]
    assert old_slices(["electronics"], counts, 0.0) == []  # 40 records is not none
    assert old_slices(["toys"], {}, 0.05) == ["toys"]


# -- EWC under ZeRO-3: local penalties add up to the full one --------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ewc_local_penalties_sum_to_the_full_penalty_and_gradient(world: int) -> None:
    import torch

    from tuneloop.train.ewc import local_penalty, local_range

    torch.manual_seed(0)
    shapes = [(4, 7), (7, 4), (3,), (1, 1)]
    theta = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    anchor = [torch.randn(s, dtype=torch.float64) for s in shapes]
    fisher = [torch.rand(s, dtype=torch.float64) for s in shapes]
    lam = 3.0
    full = lam / 2 * sum((f * (t - a) ** 2).sum() for t, a, f in zip(theta, anchor, fisher, strict=True))
    full_grad = torch.autograd.grad(full, theta)
    locals_, grads = [], [torch.zeros_like(t) for t in theta]
    for rank in range(world):
        terms = []
        for t, a, f in zip(theta, anchor, fisher, strict=True):
            lo, hi = local_range(t.numel(), rank, world)
            if hi > lo:
                terms.append(local_penalty(t, a.reshape(-1)[lo:hi], f.reshape(-1)[lo:hi], lo, hi))
        p_r = lam / 2 * sum(terms) if terms else torch.zeros((), dtype=torch.float64)
        locals_.append(float(p_r.detach()))
        if terms:  # each rank adds world * P_r; ZeRO averages the gradients over the ranks
            for g, gr in zip(grads, torch.autograd.grad(world * p_r, theta, allow_unused=True), strict=True):
                if gr is not None:
                    g += gr / world
    assert sum(locals_) == pytest.approx(float(full.detach()), rel=1e-12)
    for g, fg in zip(grads, full_grad, strict=True):
        assert torch.allclose(g, fg)
    covered = sorted(i for rank in range(world) for i in range(*local_range(28, rank, world)))
    assert covered == list(range(28))  # the ranges cover every value exactly once
