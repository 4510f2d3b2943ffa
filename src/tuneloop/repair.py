"""The forgetting repair ladder: a candidate blocked only for forgetting old slices gets repaired versions.

    repair(cfg, gate, attempt, budget, old_slices=...) -> LadderResult

It runs when the evaluation gate failed ONLY on regression rules (`max_regression`, with or without
a confidence interval) of OLD slices. An old slice is one the champion was trained or evaluated on
that this run's training data lacks, or holds at most `train.repair.old_slice_max_share` of
(old_slices() computes it from the champion's slices and this run's SFT records per slice). Any
other failed rule - an absolute floor or ceiling, a missing metric, coverage, safety, preference, or
a regression of a slice this run did train on - is not forgetting, and the ladder does not run (the
result says which rule stopped it).

Then it tries `train.repair.mitigations` in order, each alone on the run's own config (they are not
stacked), each candidate produced AND gated by the `attempt` callable exactly like the first one
(same evaluation set, same rules, same champion), and stops at the first that passes or when the
budget is spent: `max_attempts` candidates, or `max_wall_minutes` (checked before each attempt; one
that started finishes). Each mitigation is a change of config values, so it is also what a user gets
by setting those values directly:
    merge      train.merge.enabled: true - the candidate merged with the champion's adapter (no
               training; train/merge.py picks method and weights on a tuning split, never the gate's data)
    replay     data.replay_share raised to train.repair.replay_share (retrain)
    ewc        train.sft.init: champion + train.sft.ewc.lambda_: train.repair.ewc_lambda (retrain)
    lower_lr   train.sft.init: champion + train.sft.learning_rate x train.repair.lr_factor (retrain)
A mitigation that cannot apply (no champion, method full, replay already at that share) is skipped
with its reason and costs no attempt. An attempt that raises is recorded as failed with the error's
first line, and the ladder goes on.

Every attempt is recorded: mitigation, the config values it changed (plus what the attempt chose
itself, e.g. the merge), the gated per-slice metrics with their intervals and verdicts, passed, wall
time. `LadderResult.markdown()` is the table for the evaluate stage's report and the run summary;
`lineage_tags()` are the tags of a registered repaired version.

This module only decides; what an attempt does (ingest, train, merge, evaluate, gate) is the
caller's callable, so the pipeline wiring stays thin and the logic is tested with fakes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig

MITIGATIONS = ("merge", "replay", "ewc", "lower_lr")
TAG_REPAIR = "tuneloop.repair"  # the mitigation that produced a registered version ("none" for a first candidate)
TAG_REPAIR_PARAMS = "tuneloop.repair.params"
TAG_REPAIR_ATTEMPTS = "tuneloop.repair.attempts"


class Skip(Exception):
    """A mitigation that does not apply to this run (the reason is the message)."""


@dataclass
class AttemptResult:
    """What the `attempt` callable returns: the attempt's gate decision (gate.json), optionally its metrics
    (metrics.json: who -> slice -> metric), where the candidate is, and what the attempt chose itself."""

    gate: dict[str, Any]
    metrics: dict[str, Any] | None = None
    candidate: str | None = None  # the adapter folder
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    evaluation: str | None = None  # the folder with its gate.json, metrics.json, report.md

    @property
    def passed(self) -> bool:
        return bool(self.gate.get("passed"))


@dataclass
class Budget:
    max_attempts: int
    max_wall_s: float

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Budget:
        r = cfg.train.repair
        return cls(r.max_attempts, r.max_wall_minutes * 60.0)


@dataclass
class Attempt:
    """One rung tried: the record kept in the ladder's report."""

    mitigation: str
    params: dict[str, Any]
    passed: bool
    wall_s: float
    slices: list[dict[str, Any]] = field(default_factory=list)  # gated rules: slice, metric, values, ci, verdict
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate per slice
    candidate: str | None = None
    note: str = ""
    error: str | None = None
    evaluation: str | None = None


@dataclass
class LadderResult:
    ran: bool
    reason: str
    old_slices: list[str]
    attempts: list[Attempt] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # mitigation -> why it did not apply
    stopped_by: str | None = None  # "passed", "max_attempts", "max_wall_minutes", "exhausted"
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return any(a.passed for a in self.attempts)

    @property
    def winner(self) -> Attempt | None:
        return next((a for a in self.attempts if a.passed), None)

    def as_dict(self) -> dict[str, Any]:
        return {"ran": self.ran, "reason": self.reason, "old_slices": self.old_slices, "passed": self.passed,
                "winner": self.winner.mitigation if self.winner else None, "stopped_by": self.stopped_by,
                "wall_s": self.wall_s, "skipped": self.skipped, "attempts": [asdict(a) for a in self.attempts]}

    def summary(self) -> str:
        if not self.ran:
            return f"repair ladder not run: {self.reason}"
        tried = ", ".join(f"{a.mitigation} ({'pass' if a.passed else 'error' if a.error else 'fail'})"
                          for a in self.attempts) or "nothing"
        if self.winner:
            return (f"repaired by {self.winner.mitigation} (attempt {self.attempts.index(self.winner) + 1}; tried "
                    f"{tried}; {self.wall_s:.0f} s)")
        why = {"max_attempts": "the attempt budget was spent", "max_wall_minutes": "the wall-time budget was spent",
               "exhausted": "every configured mitigation was tried"}.get(self.stopped_by or "", self.stopped_by or "")
        return f"no repair passed the gate ({why}; tried {tried}; {self.wall_s:.0f} s)"

    def markdown(self) -> str:
        lines = ["## Forgetting repair ladder", "", self.summary(), ""]
        if not self.ran:
            return "\n".join(lines) + "\n"
        lines += [f"Old slices: {', '.join(self.old_slices) or '-'}. {self.reason}", ""]
        if self.attempts:
            lines += ["| # | mitigation | params | slice / metric: candidate vs reference, CI of the change, verdict | "
                      "gate | wall s |", "|---|---|---|---|---|---|"]
            for i, a in enumerate(self.attempts, 1):
                cells = "<br>".join(_rule_cell(s) for s in a.slices) or (a.error or "-")
                lines.append(f"| {i} | {a.mitigation} | {_params_cell(a.params)} | {cells} | "
                             f"{'PASS' if a.passed else '**FAIL**'} | {a.wall_s:.0f} |")
        for m, why in self.skipped.items():
            lines.append(f"- {m} skipped: {why}")
        return "\n".join(lines) + "\n"

    def lineage_tags(self) -> dict[str, str]:
        """Tags for the registered version: the mitigation that repaired it, its parameters, attempts made."""
        w = self.winner
        if w is None:
            return {}
        params = {k: v for k, v in w.params.items() if k != "dataset"}  # a local folder is no lineage
        return {TAG_REPAIR: w.mitigation, TAG_REPAIR_PARAMS: json.dumps(params, sort_keys=True)[:5000],
                TAG_REPAIR_ATTEMPTS: str(len(self.attempts))}


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, (int, float)) else str(x)


def _rule_cell(s: dict[str, Any]) -> str:
    ci = s.get("ci")
    ci_s = f" CI [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
    return (f"{s['slice']}/{s['metric']}: {_fmt(s.get('candidate'))} vs {_fmt(s.get('champion'))}{ci_s} "
            f"{s.get('verdict') or ('pass' if s.get('passed') else 'fail')}")


def _params_cell(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in p.items()) or "-"


# -- when the ladder runs --------------------------------------------------------------------------------
def old_slices(champion_slices: Iterable[str], run_slice_counts: dict[str, int], max_share: float) -> list[str]:
    """Slices the champion knows (trained or evaluated on) that this run's SFT records lack or hold at most
    `max_share` of."""
    total = sum(run_slice_counts.values())
    out = []
    for sl in sorted(set(champion_slices)):
        n = run_slice_counts.get(sl, 0)
        if n == 0 or (total > 0 and n / total <= max_share):
            out.append(sl)
    return out


def is_regression_rule(rule: dict[str, Any]) -> bool:
    return str(rule.get("kind", "")).startswith("max_regression")


def trigger(gate: dict[str, Any], old: Iterable[str]) -> tuple[bool, str]:
    """(run the ladder?, why): only when every failed rule is a regression rule of an old slice."""
    old = set(old)
    if gate.get("passed"):
        return False, "the gate passed: nothing to repair"
    failed = [r for r in gate.get("rules", []) if not r.get("passed")]
    if not failed:
        return False, "the gate failed without a failed rule to repair"
    other = [r for r in failed if not is_regression_rule(r)]
    if other:
        return False, ("the gate also failed on rules that are not regressions against the champion: "
                       + "; ".join(f"{r.get('slice')}/{r.get('metric')} ({r.get('kind')})" for r in other)
                       + " - the ladder only repairs forgetting of old slices")
    new = [r for r in failed if r.get("slice") not in old]
    if new:
        return False, ("a regression on slices this run trained on, which is not forgetting: "
                       + ", ".join(sorted({str(r.get('slice')) for r in new})))
    return True, ("only regression rules of old slices failed: "
                  + ", ".join(f"{r['slice']}/{r['metric']}" for r in failed))


# -- the mitigations as config changes -----------------------------------------------------------------
def _with(cfg: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """A copy of the config with dotted keys set, validated as a whole (so impossible combinations fail)."""
    data = cfg.model_dump()
    for dotted, value in changes.items():
        node = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return type(cfg).model_validate(data)


def mitigation_config(name: str, cfg: RunConfig, has_champion: bool = True) -> tuple[RunConfig, dict[str, Any]]:
    """(the attempt's config, the values it changed); raises Skip when the mitigation cannot apply."""
    r, t = cfg.train.repair, cfg.train
    if name not in MITIGATIONS:
        raise Skip(f"unknown mitigation {name!r}")
    if not has_champion:
        raise Skip("there is no champion (the base model is the reference): nothing to merge with, replay or "
                   "hold on to")
    if name != "replay" and t.method == "full":
        raise Skip("method full has no LoRA adapters to merge or continue")
    if name == "merge" and t.merge.enabled:
        raise Skip("train.merge.enabled is on already: the candidate was merged with the champion before the gate")
    if name != "merge" and t.alignment == "reward+rl":
        raise Skip("a retrained attempt under train.alignment reward+rl would need the run's reward model again; "
                   "the ladder retrains the dpo and none paths only (merge still applies)")
    if name == "merge":
        changes: dict[str, Any] = {"train.merge.enabled": True}
        params = {"train.merge.enabled": True, "methods": list(t.merge.methods),
                  "weights": [list(w) for w in t.merge.weights], "density": t.merge.density}
    elif name == "replay":
        if cfg.data.replay_share >= r.replay_share:
            raise Skip(f"data.replay_share is already {cfg.data.replay_share:g} (>= train.repair.replay_share "
                       f"{r.replay_share:g})")
        changes = {"data.replay_share": r.replay_share}
        params = {"data.replay_share": r.replay_share}
    elif name == "ewc":
        changes = {"train.sft.init": "champion", "train.sft.ewc.lambda_": r.ewc_lambda}
        params = {**changes, "train.sft.ewc.fisher_samples": t.sft.ewc.fisher_samples}
    else:
        lr = t.sft.learning_rate * r.lr_factor
        changes = {"train.sft.init": "champion", "train.sft.learning_rate": lr}
        params = dict(changes)
    return _with(cfg, changes), params


# -- an attempt made of the pipeline's stage functions -----------------------------------------------------
def pipeline_attempt(cfg: RunConfig, dataset: Path, candidate: Path, out: Path, *,
                     ingest: Callable[[RunConfig, Path, str], Any],
                     sft: Callable[[RunConfig, Path, Path, str], Any],
                     align: Callable[[RunConfig, Path, Path, Path, str], Any],
                     merge: Callable[[RunConfig, Path, Path, Path, str], dict[str, Any]],
                     evaluate: Callable[[RunConfig, Path, Path, Path, str], dict[str, Any]],
                     ) -> Callable[[str, RunConfig], AttemptResult]:
    """The `attempt` of a pipeline run, over its stage functions (given, so this module imports none):
        ingest(cfg, out, label)                        the dataset folder (only when data.replay_share changed)
        sft(cfg, dataset, out, label)                  out/adapter
        align(cfg, dataset, sft_out, out, label)       out/adapter: the alignment after SFT (dpo, or reward + rl;
                                                       SFT's adapter passed through when there is none)
        merge(cfg, dataset, candidate, out, label)     out/adapter; its result's `params` are recorded
        evaluate(cfg, dataset, candidate, out, label)  the evaluate stage's result: `gate`, `metrics`
    `label` is `repair/<i>-<mitigation>/<stage>`: the name the caller gives the attempt's MLflow stage run and
    checkpoints, so they are never taken for the run's own stages. Every attempt is evaluated on the first
    candidate's dataset folder, so on the very same evaluation set. Attempt i writes under
    out/<i>-<mitigation>/; its candidate is <that>/merge or <that>/aligned, its training data <that>/dataset
    when it ingested again, else `dataset` (AttemptResult.params["dataset"])."""
    made = [0]

    def attempt(name: str, acfg: RunConfig) -> AttemptResult:
        made[0] += 1
        tag = f"{made[0]}-{name}"
        base = out / tag
        params: dict[str, Any] = {}
        data = dataset
        if name == "merge":
            cand = base / "merge"
            params = dict((merge(acfg, dataset, candidate, cand, f"repair/{tag}/merge") or {}).get("params") or {})
        else:
            if acfg.data.replay_share != cfg.data.replay_share:
                data = base / "dataset"
                ingest(acfg, data, f"repair/{tag}/ingest")
            sft(acfg, data, base / "sft", f"repair/{tag}/sft")
            cand = base / "aligned"
            align(acfg, data, base / "sft", cand, f"repair/{tag}/align")
            if acfg.train.merge.enabled:  # built exactly like the first candidate: merged as it was
                merge(acfg, dataset, cand, base / "merge", f"repair/{tag}/merge")
                cand = base / "merge"
        result = evaluate(acfg, dataset, cand, base / "evaluation", f"repair/{tag}/evaluate")
        return AttemptResult(result["gate"], result.get("metrics"), str(cand / "adapter"),
                             {**params, "dataset": str(data)}, evaluation=str(base / "evaluation"))

    return attempt


# -- the ladder ------------------------------------------------------------------------------------------
def _gated(result: AttemptResult) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    keep = ("slice", "metric", "kind", "candidate", "champion", "threshold", "ci", "verdict", "passed")
    rules = [{k: r.get(k) for k in keep if k in r} for r in result.gate.get("rules", [])]
    per_slice: dict[str, dict[str, float]] = {}
    for sl, m in ((result.metrics or {}).get("candidate") or {}).items():
        per_slice[sl] = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return rules, per_slice


def repair(cfg: RunConfig, gate_result: dict[str, Any], attempt: Callable[[str, RunConfig], AttemptResult],
           budget: Budget | None = None, *, old_slices: Iterable[str], has_champion: bool = True,
           clock: Callable[[], float] = time.monotonic) -> LadderResult:
    """Run the ladder for a blocked candidate (see the module docstring). `gate_result` is the first
    candidate's gate decision (gate.json, or the evaluate stage's result holding it under `gate`);
    `attempt(mitigation, config)` makes one repaired candidate and gates it; `old_slices` from old_slices()."""
    gate = gate_result.get("gate", gate_result) if "rules" not in gate_result else gate_result
    old = sorted(set(old_slices))
    start = clock()
    if not cfg.train.repair.enabled:
        return LadderResult(False, "train.repair.enabled is false", old)
    run, why = trigger(gate, old)
    if not run:
        return LadderResult(False, why, old)
    budget = budget or Budget.from_config(cfg)
    result = LadderResult(True, why, old)
    for name in cfg.train.repair.mitigations:
        if len(result.attempts) >= budget.max_attempts:
            result.stopped_by = "max_attempts"
            break
        if clock() - start >= budget.max_wall_s:
            result.stopped_by = "max_wall_minutes"
            break
        try:
            attempt_cfg, params = mitigation_config(name, cfg, has_champion)
        except Skip as e:
            result.skipped[name] = str(e)
            continue
        t0 = clock()
        try:
            out = attempt(name, attempt_cfg)
        except Exception as e:  # noqa: BLE001 - one failed rung is recorded; the ladder goes on
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            result.attempts.append(Attempt(name, params, False, clock() - t0, error=f"{type(e).__name__}: {msg}"))
            continue
        rules, per_slice = _gated(out)
        result.attempts.append(Attempt(name, {**params, **out.params}, out.passed, clock() - t0, rules, per_slice,
                                       out.candidate, out.note, evaluation=out.evaluation))
        if out.passed:
            result.stopped_by = "passed"
            break
    else:
        result.stopped_by = "exhausted"
    result.wall_s = clock() - start
    return result
