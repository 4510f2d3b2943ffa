"""Forgetting, repaired and explained: test_forgetting.py's scenario (tiny random Llama; routing is the old
skill the champion learned, QA the new one the degraded candidate was trained on alone). The blocked
candidate goes through the repair ladder (tuneloop.repair) with a real `attempt` that trains (or merges)
and gates exactly like the first candidate, cheapest mitigation first (merge needs no training), and
gets a diagnosis naming the slice it was not trained on. EWC: continuing the champion's adapter on the
new data, the old slice's NLL rises less with the penalty than without (same seed), also under ZeRO-3
with the LoRA parameters partitioned over 2 processes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_forgetting import DEMO, GATES, HP, LORA, _evaluate, _train

pytestmark = [pytest.mark.integration, pytest.mark.forgetting]
EWC_LAMBDA = 1e7  # the tiny model's Fisher: mean ~2e-5, median ~5e-9 (ewc.json); the penalty ends near half the loss


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("forgetting-repair")
    gates = tmp / "gates.yaml"
    gates.write_text(yaml.safe_dump(GATES))
    champion = _train(tiny_model_dir, ["train/tickets.jsonl"], tmp / "champion", tmp)
    degraded = _train(tiny_model_dir, ["train/general.jsonl"], tmp / "degraded", tmp)
    blocked = _evaluate(degraded, champion, gates, tmp / "eval-degraded")
    assert blocked["passed"] is False
    return {"tmp": tmp, "model": tiny_model_dir, "gates": gates, "champion": champion, "degraded": degraded,
            "blocked": blocked, "champion_data": tmp / "champion" / "data" / "sft.jsonl"}


def _ladder_config(s: dict[str, Any]):
    from tuneloop.config import load_config
    from tuneloop.tiny import tiny_run_config

    return load_config(tiny_run_config(
        s["tmp"] / "ladder", s["model"], evaluate=GATES, train__lora=LORA, train__sft=dict(HP),
        train__merge={"methods": ["linear", "ties", "dare_ties"], "weights": [[1.0, 1.0], [0.5, 0.5], [0.3, 0.7]]},
        train__repair={"mitigations": ["merge", "replay", "ewc", "lower_lr"], "max_attempts": 4,
                       "max_wall_minutes": 8, "replay_share": 0.5, "ewc_lambda": EWC_LAMBDA, "lr_factor": 0.3}))


def _attempt(s: dict[str, Any]):
    """Make one repaired candidate as the config says and gate it exactly like the first one."""
    from tuneloop.repair import AttemptResult
    from tuneloop.train.ewc import prepare_anchor
    from tuneloop.train.merge import merge_with_champion

    def attempt(name: str, cfg: Any) -> AttemptResult:
        out = s["tmp"] / f"attempt-{name}"
        params: dict[str, Any] = {}
        if cfg.train.merge.enabled:  # no training: the blocked candidate merged with the champion
            sel = merge_with_champion(s["model"], s["degraded"], s["champion"],
                                      [s["degraded"].parent / "data" / "sft.jsonl", s["champion_data"]],
                                      s["degraded"].parent / "data" / "eval.jsonl", cfg.train.merge, out)
            candidate = sel.adapter
            params = {"chosen": sel.best.name, "tuning_regret": round(sel.best.regret, 4),
                      "tuning_records": sel.tuning_records}
        else:
            sft = cfg.train.sft.model_dump()
            init = None
            if sft["init"] == "champion":
                init = s["champion"]
                if sft["ewc"]["lambda_"] > 0:
                    init = prepare_anchor(s["model"], s["champion"], s["champion_data"], out / "anchor",
                                          sft["ewc"]["fisher_samples"], sft["max_length"])
            candidate = _train(s["model"], ["train/general.jsonl"], out, s["tmp"], replay_from=s["champion_data"],
                               replay_share=cfg.data.replay_share, sft=sft, init_adapter=init, check_loss=False)
        gate = _evaluate(candidate, s["champion"], s["gates"], out / "eval")
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        return AttemptResult(gate, metrics, str(candidate), params, evaluation=str(out / "eval"))

    return attempt


def _line(who: str, gate: dict[str, Any]) -> str:
    cells = []
    for r in gate["rules"]:
        ci = r.get("ci")
        cells.append(f"{r['slice']} nll {r['candidate']:.3f} (change {r['candidate'] - r['champion']:+.3f}, 90% CI "
                     f"[{ci[0]:+.3f}, {ci[1]:+.3f}] {r.get('verdict')})")
    return f"{who}: " + "; ".join(cells)


def test_the_ladder_repairs_the_blocked_candidate_and_the_diagnosis_names_the_slice(scenario) -> None:
    from tuneloop.evaluate.diagnosis import diagnose, to_markdown
    from tuneloop.repair import TAG_REPAIR, old_slices, repair

    s = scenario
    cfg = _ladder_config(s)
    counts = json.loads((s["degraded"].parent / "data" / "report.json").read_text())["by_kind"]["sft"]["per_slice"]
    old = old_slices(["ticket_routing", "general_qa"], counts, cfg.train.repair.old_slice_max_share)
    assert old == ["ticket_routing"]
    started = time.perf_counter()
    res = repair(cfg, s["blocked"], _attempt(s), old_slices=old)
    wall = time.perf_counter() - started
    assert res.ran and "ticket_routing/nll" in res.reason
    assert res.attempts and all(a.slices and all("ci" in r for r in a.slices) for a in res.attempts)
    champ = json.loads((s["tmp"] / "eval-degraded" / "metrics.json").read_text())["champion"]
    print(f"\nchampion: ticket_routing nll {champ['ticket_routing']['nll']:.3f}, general_qa nll "
          f"{champ['general_qa']['nll']:.3f}")
    print(_line("blocked", s["blocked"]))
    for a in res.attempts:
        print(_line(f"{a.mitigation} ({'PASS' if a.passed else 'fail'}, {a.wall_s:.0f} s, {a.params})",
                    {"rules": a.slices}))
    print(f"ladder: {res.summary()}; wall {wall:.0f} s")
    (s["tmp"] / "ladder.md").write_text(res.markdown())
    assert res.passed, res.markdown()  # replay of the champion's data repairs it when the merge does not
    assert res.lineage_tags()[TAG_REPAIR] == res.winner.mitigation
    winner_rules = {r["slice"]: r for r in res.winner.slices}
    assert winner_rules["ticket_routing"]["verdict"] == "pass"

    d = diagnose(s["tmp"] / "eval-degraded", s["degraded"].parent / "data", s["champion_data"], None, cfg.evaluate,
                 base_dir=s["model"], candidate=s["degraded"], attribution_seconds=60, repair=res.as_dict())
    assert d["causes"][0]["cause"].startswith("slice ticket_routing had no training records in this run")
    assert d["regressions"][0]["slice"] == "ticket_routing" and d["regressions"][0]["ci"][0] > 0.1
    assert d["flipped"]["counts"]["ticket_routing"]["records"] == 48
    assert d["attributions"]["records"] or d["attributions"]["note"]
    md = to_markdown(d)
    assert "## Repair ladder" in md and res.winner.mitigation in md
    (s["tmp"] / "diagnosis.md").write_text(md)


def _old_slice_nll(model: Path, adapter: Path, records: list[dict[str, Any]]) -> float:
    from tuneloop.evaluate.scoring import completion_logprobs
    from tuneloop.models import load_causal_lm

    m, tok = load_causal_lm(model, adapter)
    lps = completion_logprobs(m, tok, [r["prompt"] for r in records], [r["completion"] for r in records], 16)
    return -sum(lp for lp, _ in lps) / sum(n for _, n in lps)


def test_ewc_keeps_the_old_slice_closer_than_plain_continued_training(scenario) -> None:
    from tuneloop.jsonl import read_jsonl
    from tuneloop.train.ewc import prepare_anchor

    s = scenario
    tickets = [r for r in read_jsonl(s["champion"].parent / "data" / "eval.jsonl") if r["slice"] == "ticket_routing"]
    anchor = prepare_anchor(s["model"], s["champion"], s["champion_data"], s["tmp"] / "ewc-anchor", 64, 128)
    steps = {"max_steps": 40, "init": "champion"}
    plain = _train(s["model"], ["train/general.jsonl"], s["tmp"] / "ewc-off", s["tmp"], sft=steps,
                   init_adapter=s["champion"], check_loss=False)
    ewc = _train(s["model"], ["train/general.jsonl"], s["tmp"] / "ewc-on", s["tmp"],
                 sft={**steps, "ewc": {"lambda_": EWC_LAMBDA}}, init_adapter=anchor, check_loss=False)
    # the same under ZeRO-3, every parameter partitioned over 2 processes (same global batch: 2 x 4)
    ewc_z3 = _train(s["model"], ["train/general.jsonl"], s["tmp"] / "ewc-on-zero3", s["tmp"],
                    sft={**steps, "ewc": {"lambda_": EWC_LAMBDA}, "per_device_batch_size": HP["per_device_batch_size"]
                         // 2}, init_adapter=anchor, deepspeed="zero3", nproc=2, check_loss=False,
                    persistence_threshold_zero=True)
    base = _old_slice_nll(s["model"], s["champion"], tickets)
    change = {k: _old_slice_nll(s["model"], a, tickets) - base
              for k, a in (("plain", plain), ("ewc", ewc), ("ewc_zero3", ewc_z3))}
    print(f"\nold slice (ticket_routing) NLL change after 40 steps on general_qa from the champion {base:.3f}: "
          + ", ".join(f"{k} {v:+.3f}" for k, v in change.items()))
    assert change["ewc"] < change["plain"], change
    assert change["ewc_zero3"] < change["plain"], change
    z3 = json.loads((s["tmp"] / "ewc-on-zero3" / "ewc.json").read_text())
    assert z3["world_size"] == 2 and z3["partitioned_parameters"] == z3["parameters"] > 0
    assert 0 < z3["local_values"] < z3["total_values"]  # rank 0 held only its partition of theta* and F
    assert z3["first_penalty"] == pytest.approx(0.0, abs=1e-9) and z3["last_penalty"] > 0
    one = json.loads((s["tmp"] / "ewc-on" / "ewc.json").read_text())
    assert one["world_size"] == 1 and one["local_values"] == one["total_values"]
    assert one["fisher"]["records"] == 64
    assert DEMO.exists()
