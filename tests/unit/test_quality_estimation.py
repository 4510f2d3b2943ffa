"""Label-free quality estimation: the label probabilities a model gives, the calibration reference stored
with a version, NannyML CBPE following a shift, and the monitor's report (JSON, .prom, the floor signal)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from conftest import tiny_config

pytestmark = pytest.mark.unit

LABELS = ["billing", "shipping", "account", "technical"]


def simulate(n: int, rng: np.random.Generator, margin: float = 2.5, labels: list[str] = LABELS,
             start: float = 0.0, span: float = 1.0) -> list[dict]:
    """A calibrated classifier: label probabilities from noisy logits, the truth drawn from them, the answer
    their argmax. A smaller `margin` is harder traffic (a covariate shift): less confident, less accurate."""
    rows = []
    for _ in range(n):
        logits = rng.normal(0, 1, len(labels))
        logits[rng.integers(len(labels))] += margin
        p = np.exp(logits) / np.exp(logits).sum()
        rows.append({"probs": p.tolist(), "pred": labels[int(p.argmax())], "true": labels[rng.choice(len(labels), p=p)],
                     "created": start + rng.uniform(0, span)})
    return rows


def test_label_probabilities_are_the_softmax_of_label_likelihoods(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.evaluate.label_probs import add_label_probs, label_probabilities, label_probability_batch
    from tuneloop.evaluate.scoring import completion_logprobs

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Route this ticket: my parcel is late"}],
                                     tokenize=False, add_generation_prompt=True)
    p = label_probabilities(model, tok, prompt, LABELS)
    assert list(p) == LABELS and math.isclose(sum(p.values()), 1.0, abs_tol=1e-6)
    lps = [lp for lp, _ in completion_logprobs(model, tok, [prompt] * 4, [lab + tok.eos_token for lab in LABELS], 4)]
    expected = np.exp(np.array(lps) - max(lps)) / np.exp(np.array(lps) - max(lps)).sum()
    assert np.allclose([p[lab] for lab in LABELS], expected, atol=1e-5)
    batch = label_probability_batch(model, tok, [prompt, prompt], LABELS, batch_size=3)  # batches cut across prompts
    assert np.allclose([batch[1][lab] for lab in LABELS], [p[lab] for lab in LABELS], atol=1e-5)

    # evaluation's hook: scored eval rows of the classification slices get them
    records = [{"slice": "ticket_routing", "prompt": prompt}, {"slice": "general_qa", "prompt": prompt}]
    scored = add_label_probs(model, tok, records, [{}, {}], {"ticket_routing": LABELS}, 8)
    assert scored[1] == {} and np.allclose(list(scored[0]["label_probs"].values()), [p[lab] for lab in LABELS])

    # the gateway's hook: the served prompt (operator first), off the request path, into the quality table
    import threading
    from types import SimpleNamespace

    from sqlalchemy import create_engine

    from tuneloop.monitor.labels import QualityStore, record_label_probs

    qs = QualityStore(create_engine("sqlite://"))
    backend = SimpleNamespace(model=model, tokenizer=tok, lock=threading.Lock())
    record_label_probs(qs, backend, [{"role": "user", "content": "Route this ticket: my parcel is late"}], "r1", "7",
                       "ticket_routing", LABELS)
    stored = qs.probs(["r1"])["r1"]
    assert stored["model_version"] == "7" and np.allclose([stored["probs"][lab] for lab in LABELS],
                                                          [p[lab] for lab in LABELS], atol=1e-5)


def test_reference_from_evaluation_predictions(tmp_path):
    from tuneloop.config import EvaluateConfig
    from tuneloop.evaluate.calibration import read_reference, reference_summary, write_reference

    cfg = EvaluateConfig.model_validate({"slices": {"t": {"task": "classification", "labels": LABELS},
                                                    "g": {"task": "generation"}},
                                         "gates": [{"metric": "nll", "slice": "t", "max_regression": 1.0}]})
    rng = np.random.default_rng(0)
    preds = []
    for i, r in enumerate(simulate(60, rng)):
        preds.append({"model": "candidate", "id": f"e{i}", "slice": "t", "prediction": r["pred"] if i % 10 else "??",
                      "reference": r["true"], "label_probs": dict(zip(LABELS, r["probs"]))})
    preds += [{**preds[0], "model": "champion"}, {"model": "candidate", "id": "g1", "slice": "g", "prediction": "x",
                                                 "reference": "y"}]
    (tmp_path / "predictions.jsonl").write_text("\n".join(json.dumps(p) for p in preds))
    ref = write_reference(tmp_path / "predictions.jsonl", cfg, tmp_path / "ref.json", version="3")
    assert set(ref["slices"]) == {"t"} and ref["slices"]["t"]["n"] == 60
    t = reference_summary(read_reference(tmp_path / "ref.json"))["t"]
    assert t["off_label_share"] == pytest.approx(6 / 60) and 0 <= t["ece_raw"] < 0.3
    assert t["accuracy"] == pytest.approx(np.mean([p["prediction"] == p["reference"] for p in preds[:60]]))
    assert write_reference(tmp_path / "none.jsonl", cfg, tmp_path / "none.json") is None  # no probabilities: no file
    assert not (tmp_path / "none.json").exists()


def test_the_estimate_follows_an_injected_shift():
    from tuneloop.monitor.estimate import estimate

    rng = np.random.default_rng(1)
    ref = {"labels": LABELS, "rows": simulate(400, rng)}
    now = 1_000_000.0
    since = now - 24 * 3600
    same = simulate(600, rng, start=since, span=24 * 3600)
    harder = simulate(600, rng, margin=1.0, start=since, span=24 * 3600)  # covariate shift: less confident
    e_same = estimate(ref, same, since, now, 6, 0.9)
    e_hard = estimate(ref, harder, since, now, 6, 0.9)
    for e, rows in ((e_same, same), (e_hard, harder)):
        acc = e["window"]["accuracy"]
        realized = np.mean([r["pred"] == r["true"] for r in rows])
        assert abs(acc["value"] - realized) < 0.06, (acc, realized)
        assert acc["lower"] < acc["value"] < acc["upper"] and acc["upper"] - acc["lower"] < 0.15
        assert len(e["chunks"]) == 4 and sum(c["n"] for c in e["chunks"]) == len(rows)
        assert e["window"]["macro_f1"]["value"] is not None
    assert e_hard["window"]["accuracy"]["value"] < e_same["window"]["accuracy"]["value"] - 0.15
    # a chunk's interval is wider than the window's (fewer requests)
    assert e_same["chunks"][0]["accuracy"]["sampling_error"] > e_same["window"]["accuracy"]["sampling_error"]


def test_answers_that_are_no_label_count_as_wrong():
    from tuneloop.monitor.estimate import estimate

    rng = np.random.default_rng(2)
    ref = {"labels": LABELS, "rows": simulate(300, rng)}
    rows = simulate(400, rng, start=0, span=3600)
    base = estimate(ref, rows, 0, 3600, 1, 0.9)["window"]["accuracy"]["value"]
    for r in rows[:100]:
        r["pred"] = None  # the model answered something else
    e = estimate(ref, rows, 0, 3600, 1, 0.9)
    assert e["labelled_answers"] == 300
    assert e["window"]["accuracy"]["value"] == pytest.approx(base * 0.75, abs=0.04)


def _log(store, rows, slice_="ticket_routing", version="base"):
    from tuneloop.monitor.labels import QualityStore

    for i, r in enumerate(rows):
        r["request_id"] = r.get("request_id") or f"q{i}-{r['created']:.0f}"
        store.log_request(request_id=r["request_id"], user_id="u", model_version=version, variant="champion",
                          slice=slice_, prompt=f"ticket {i}", output=r["pred"] or "I cannot tell", status="ok",
                          latency_ms=5.0, created=r["created"])
    store.flush()
    QualityStore(store.engine).record_probs([{"request_id": r["request_id"], "model_version": version,
                                              "slice": slice_, "probs": dict(zip(LABELS, r["probs"])),
                                              "created": r["created"]} for r in rows])


def write_test_reference(cfg, rows, version="base"):
    """The reference the register stage would store, put where the monitor caches a downloaded one."""
    path = cfg.state_path / "quality" / f"reference-{version}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "version": version, "slices": {"ticket_routing": {
        "labels": LABELS, "n": len(rows), "rows": [{"id": str(i), "probs": r["probs"], "pred": r["pred"],
                                                    "true": r["true"]} for i, r in enumerate(rows)]}}}))


def test_monitor_reports_estimated_quality_and_fires_below_the_floor(tmp_path, tiny_model_dir):
    from tuneloop.config import load_config
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.monitor.check import check, prometheus_text

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data__drift__enabled=False,
                                  monitor__min_estimated_accuracy=0.6, monitor__estimate_max_requests=0,
                                  monitor__retrain_on=["estimated_quality"]))
    rng = np.random.default_rng(3)
    write_test_reference(cfg, simulate(300, rng))
    store = FeedbackStore(cfg.feedback_db)
    now = time.time()
    _log(store, simulate(200, rng, start=now - 20 * 3600, span=8 * 3600))  # healthy traffic, hours ago
    healthy = check(cfg, tmp_path / "m1", now=now)
    q = healthy["quality"]["slices"]["ticket_routing"]
    assert q["requests"] == 200 and q["with_probabilities"] == 200 and q["estimate_verdict"] == "ok"
    assert q["estimate"]["window"]["accuracy"]["value"] > 0.65 and healthy["retrain"] is False
    _log(store, simulate(300, rng, margin=0.8, start=now - 4 * 3600, span=4 * 3600))  # then harder traffic
    shifted = check(cfg, tmp_path / "m2", now=now)
    q = shifted["quality"]["slices"]["ticket_routing"]
    assert q["estimate_verdict"] == "below" and shifted["reasons"] == ["estimated_quality"]
    chunks = q["estimate"]["chunks"]  # the drop shows in the latest chunk, not in the earlier ones
    assert chunks[-1]["accuracy"]["value"] < chunks[0]["accuracy"]["value"] - 0.2
    saved = json.loads((tmp_path / "m2" / "monitor.json").read_text())
    assert saved["quality"]["slices"]["ticket_routing"]["estimate"]["window"]["accuracy"]["upper"] is not None
    prom = (tmp_path / "m2" / "monitor.prom").read_text()
    assert prom == prometheus_text(shifted)
    value = q["estimate"]["window"]["accuracy"]["value"]
    assert f'tuneloop_monitor_estimated_accuracy{{champion="base",slice="ticket_routing"}} {value}' in prom
    assert 'tuneloop_monitor_estimated_accuracy_lower{champion="base",slice="ticket_routing"}' in prom
    assert 'tuneloop_monitor_estimate_below_floor{champion="base",slice="ticket_routing"} 1.0' in prom
    assert prom.count("# TYPE tuneloop_monitor_estimated_macro_f1 gauge") == 1


def test_monitor_without_a_reference_says_so(tmp_path, tiny_model_dir):
    from tuneloop.config import load_config
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.monitor.check import check

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data__drift__enabled=False,
                                  monitor__min_estimated_accuracy=0.7))
    store = FeedbackStore(cfg.feedback_db)
    _log(store, simulate(20, np.random.default_rng(4), start=time.time() - 60, span=10))
    r = check(cfg, tmp_path / "m", now=time.time())
    q = r["quality"]
    assert "no calibration reference" in q["reference"]["note"]
    assert q["slices"]["ticket_routing"]["estimate_verdict"] == "no_estimate"
    assert "estimated_quality" not in r["reasons"]


def test_monitor_scores_requests_the_gateway_recorded_nothing_for(tmp_path, tiny_model_dir):
    """Without recorded probabilities the monitor computes them with the champion (here the base model) from
    the logged prompt, for a random sample up to estimate_max_requests, once."""
    from tuneloop.config import load_config
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.monitor.check import check

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data__drift__enabled=False,
                                  monitor__estimate_max_requests=12))
    write_test_reference(cfg, simulate(200, np.random.default_rng(5)))
    store = FeedbackStore(cfg.feedback_db)
    now = time.time()
    for i in range(20):
        store.log_request(request_id=f"p{i}", user_id="u", model_version="base", variant="champion",
                          slice="ticket_routing", prompt=f"Route this ticket: order {i} never arrived",
                          output=LABELS[i % 4], status="ok", latency_ms=5.0, created=now - 600 + i)
    first = check(cfg, tmp_path / "m1", now=now)["quality"]
    assert first["probabilities_computed"] == 12 and first["slices"]["ticket_routing"]["with_probabilities"] == 12
    assert first["slices"]["ticket_routing"]["estimate"]["window"]["accuracy"]["value"] is not None
    again = check(cfg, tmp_path / "m2", now=now)["quality"]
    assert again["probabilities_computed"] == 0 and again["slices"]["ticket_routing"]["with_probabilities"] == 12
