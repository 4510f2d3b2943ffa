"""Data-plane throughput: ingest + PII scrubbing + exact dedup + validation of N short records, one core.

    python bench/data_throughput.py --records 1000000

Generates a JSONL corpus of ~200-character support tickets first (not timed), with a stated mix:
`--pii-share` of the records carry one PII item (email, phone, card, IBAN, IP or URL),
`--digit-share` carry a number of 4+ digits that is not PII (order numbers, prices, dates: the
texts the PII pre-filter cannot clear), `--dup-share` repeat an earlier record, `--bad-share` are
broken (truncated JSON, empty prompt). Then, pinned to one CPU core:

  1. floor: reading + JSON-parsing the file with the same reader (the I/O+parse baseline);
  2. PII: Presidio on every text of a sample vs. the scrubber with its pre-filter (same sample);
  3. the measured path: `ingest` (schema checks, PII scrubbing, exact dedup, eval-leak check, quarantine,
     writes; near-duplicate detection off: bench/near_dup.py measures it) followed by `validate_dataset`
     (the Great Expectations suite; no tokenizer, so no token-length checks; PII residue on a 10k sample).

Memory is sampled every 0.2 s; the last line is `records_per_s=<N> peak_rss_mb=<M>` for step 3.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

LABELS = ["billing", "shipping", "account", "technical"]
OPEN = ["Hello,", "Hi there,", "Good morning,", "Dear support,", "Hey,", "Hi team,", "Hello again,", ""]
SUBJECT = ["my order", "the invoice", "my account", "the app", "my parcel", "the refund", "my subscription",
           "the password reset", "the delivery", "my card payment", "the tablet", "the kettle", "the router"]
PROBLEM = ["has not arrived yet", "shows the wrong amount", "keeps crashing when I open it", "was charged twice",
           "is stuck at the depot", "cannot be found anywhere", "was cancelled without notice",
           "does not accept my login", "arrived damaged", "was never confirmed", "is missing an item"]
ASK = ["Can you check what happened?", "Please advise on the next steps.", "Could someone look into it?",
       "I would like a refund.", "What should I do now?", "Please fix this soon.", "Is there an update?"]


def _words(rng: random.Random, n: int) -> list[str]:
    syll = ["ka", "lo", "mi", "ren", "sto", "vel", "dor", "pa", "qui", "zen", "tra", "mon", "bel", "fi", "gor"]
    return ["".join(rng.choice(syll) for _ in range(rng.randint(2, 3))) for _ in range(n)]


def _pii(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return f"mail me at {rng.choice(['anna', 'j.doe', 'sam_k'])}{rng.randint(1, 999)}@example.com"
    if kind == 1:
        return f"call me on +44 20 7946 {rng.randint(1000, 9999)}"
    if kind == 2:
        return "my card 4111 1111 1111 1111 was used"
    if kind == 3:
        return "refund to DE89 3704 0044 0532 0130 00"
    if kind == 4:
        return f"my IP is 192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    return f"see https://shop.example.org/orders/{rng.randint(1, 99)}"


def _number(rng: random.Random) -> str:
    return rng.choice([f"order #{rng.randint(10000, 99999)}", f"it cost {rng.randint(10, 99)}.{rng.randint(10, 99)}",
                       f"since 2026-0{rng.randint(1, 9)}-{rng.randint(10, 28)}"])


def generate(path: Path, n: int, seed: int, pii_share: float, digit_share: float, dup_share: float,
             bad_share: float) -> dict[str, int]:
    rng = random.Random(seed)
    vocab = _words(rng, 3000)
    mix = {"pii": 0, "digits": 0, "dup": 0, "bad": 0}
    recent: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            u = rng.random()
            if u < bad_share:
                mix["bad"] += 1
                f.write(rng.choice(['{"id": "bad-%d", "prompt": "cut off mid' % i,
                                    json.dumps({"id": f"bad-{i}", "prompt": "   ", "response": "billing"})]) + "\n")
                continue
            if u < bad_share + dup_share and recent:
                mix["dup"] += 1
                rec = json.loads(rng.choice(recent))
                rec["id"] = f"dup-{i}"
                f.write(json.dumps(rec) + "\n")
                continue
            extra = " ".join(rng.choice(vocab) for _ in range(4))
            parts = [rng.choice(OPEN), f"{rng.choice(SUBJECT)} ({extra})", rng.choice(PROBLEM) + "."]
            v = rng.random()
            if v < pii_share:
                mix["pii"] += 1
                parts.append(_pii(rng) + ".")
            elif v < pii_share + digit_share:
                mix["digits"] += 1
                parts.append(_number(rng) + ".")
            parts.append(rng.choice(ASK))
            prompt = " ".join(p for p in parts if p)
            while len(prompt) < 170:
                prompt += " " + rng.choice(vocab)
            line = json.dumps({"id": f"r{i}", "prompt": prompt, "response": rng.choice(LABELS),
                               "slice": "ticket_routing"})
            f.write(line + "\n")
            if len(recent) < 1000:
                recent.append(line)
            elif rng.random() < 0.01:
                recent[rng.randrange(1000)] = line
    return mix


class RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.stop.is_set():
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page / 2**20
            self.samples.append((time.perf_counter(), rss))
            time.sleep(0.2)


def config(workdir: Path, data: Path, eval_path: Path):
    from tuneloop.config import parse_config

    return parse_config({
        "name": "bench", "state_dir": str(workdir / "state"),
        "base_model": {"path": "unused", "name": "bench"},
        "data": {"sources": [{"path": str(data)}], "eval": [{"path": str(eval_path)}],
                 "dedup": {"near_threshold": 0}, "drift": {"enabled": False}},
        "train": {"dpo": {"enabled": False}},
        "evaluate": {"slices": {"ticket_routing": {"task": "classification", "labels": LABELS}},
                     "gates": [{"metric": "accuracy", "slice": "ticket_routing", "min": 0.1}]},
        "registry": {"model_name": "bench"},
        "deploy": {"canary": {"traffic_file": "unused.jsonl"}},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000, help="records to generate and process")
    ap.add_argument("--pii-share", type=float, default=0.02, help="share of records with one PII item")
    ap.add_argument("--digit-share", type=float, default=0.05, help="share with a 4+ digit number that is not PII")
    ap.add_argument("--dup-share", type=float, default=0.01, help="share of exact duplicates of earlier records")
    ap.add_argument("--bad-share", type=float, default=0.005, help="share of broken records")
    ap.add_argument("--pii-sample", type=int, default=2000, help="records in the Presidio-on-everything baseline")
    ap.add_argument("--workdir", type=Path, default=None, help="where the corpus and outputs go (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core

    from tuneloop.data.ingest import ingest
    from tuneloop.data.pii import PiiScrubber
    from tuneloop.data.readers import read_records
    from tuneloop.data.validate import validate_dataset

    work = args.workdir or Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data, ev = work / "tickets.jsonl", work / "eval.jsonl"
    t = time.perf_counter()
    mix = generate(data, args.records, args.seed, args.pii_share, args.digit_share, args.dup_share, args.bad_share)
    ev.write_text(json.dumps({"id": "e1", "prompt": "An eval prompt that no ticket repeats", "response": "billing",
                              "slice": "ticket_routing"}) + "\n")
    size = data.stat().st_size
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work on the machine "
          "slows every figure below alike)")
    print(f"corpus: {args.records} records, {size / 2**20:.0f} MiB, {size / args.records:.0f} bytes/record "
          f"({time.perf_counter() - t:.0f} s to generate); mix {mix}")
    cfg = config(work, data, ev)

    # 1. the read+parse floor
    t = time.perf_counter()
    n = sum(1 for _ in read_records(str(data)))
    floor = n / (time.perf_counter() - t)
    print(f"floor (read + JSON parse only): {floor:,.0f} records/s")

    # 2. PII: Presidio on everything vs. pre-filter, same sample
    sample = []
    for raw in read_records(str(data)):
        if raw.data and isinstance(raw.data.get("prompt"), str):
            sample.append(raw.data["prompt"])
        if len(sample) == args.pii_sample:
            break
    def seconds_per_text(method: str) -> tuple[float, PiiScrubber]:
        scrubber = PiiScrubber(cfg.data.pii)
        scrubber.scrub("warm up a@b.com 030 123456")
        t = time.perf_counter()
        for s in sample:
            getattr(scrubber, method)(s)
        return (time.perf_counter() - t) / len(sample), scrubber

    t_full, _ = seconds_per_text("analyze")  # Presidio on every text
    t_gated, gated = seconds_per_text("scrub")  # behind the pre-filter
    print(f"PII on {len(sample)} prompts: Presidio on every text {t_full * 1e3:.2f} ms/text, with the pre-filter "
          f"{t_gated * 1e3:.3f} ms/text ({t_full / t_gated:.1f}x faster; "
          f"{(gated.texts_analyzed - 1) / len(sample):.1%} of texts still went to Presidio)")

    # 3. the measured path
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    rep = ingest(cfg.data, None, work / "dataset")
    t1 = time.perf_counter()
    val = validate_dataset(cfg, work / "dataset", None, work / "validation")
    t2 = time.perf_counter()
    sampler.stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    during = [(ts, r) for ts, r in sampler.samples if t0 <= ts <= t1]
    curve = []
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        at = t0 + frac * (t1 - t0)
        curve.append(f"{frac:.0%} {min(during, key=lambda x: abs(x[0] - at))[1]:.0f}" if during else "-")
    pii = rep["pii"]
    print(f"ingest: {t1 - t0:.1f} s, read {rep['read']}, accepted {rep['accepted']}, quarantined "
          f"{rep['quarantined']} {rep['per_reason']}")
    print(f"  PII: {pii['texts_analyzed']} of {pii['texts_seen']} texts went to Presidio "
          f"({pii['texts_analyzed'] / max(pii['texts_seen'], 1):.1%}); replaced {pii['entities']}")
    print(f"  RSS during ingest (MiB, by share of ingest time): {', '.join(curve)}; before ingest "
          f"{sampler.samples[0][1]:.0f}" if sampler.samples else "")
    print(f"validate_data (GX suite, {len(val['checks'])} checks, passed={val['passed']}): {t2 - t1:.1f} s")
    rate = args.records / (t2 - t0)
    print(f"end to end: {t2 - t0:.1f} s for {args.records} records = {rate:,.0f} records/s "
          f"({rate / floor:.2f} of the read+parse floor); workdir {work}")
    sys.stdout.flush()
    print(f"records_per_s={rate:.0f} peak_rss_mb={peak:.0f}")


if __name__ == "__main__":
    main()
