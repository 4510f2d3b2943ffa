"""Near-duplicate detection (MinHash LSH, datasketch): time against the index size, one core.

    python bench/near_dup.py            # 10k and 100k records (the issue's figures)
    python bench/near_dup.py --sizes 10000 100000 300000

For each size N, N ~200-character tickets are generated (3% are light edits of an earlier one:
a word swapped, punctuation changed) and each is signed, queried against everything indexed
so far, and inserted: exactly what ingest does per record. Reported: seconds, microseconds per
record, near-duplicates found. `scaling` is the per-record cost at the largest size over that at
the smallest (1.0 = perfectly linear total time; the smallest size is run three times and the
fastest kept, a 1-second run being noisy). A second view from inside the largest run, where both
figures see the same machine load: the cost of its last 10k records (index of N-10k records)
over that of its second 10k (the first block also pays warm-up). The signature alone (shingling
+ MinHash, independent of N) is timed too: the rest is the LSH query and insert.
Last line: `near_dup_s_10000=<s> near_dup_s_100000=<s> scaling=<ratio>`.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def texts(n: int, seed: int = 0) -> list[str]:
    from data_throughput import ASK, OPEN, PROBLEM, SUBJECT, _words

    rng = random.Random(seed)
    vocab = _words(rng, 3000)
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.03:
            words = rng.choice(out).split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
            out.append(" ".join(words).replace(".", "!", 1))
            continue
        t = " ".join([rng.choice(OPEN), rng.choice(SUBJECT), " ".join(rng.choice(vocab) for _ in range(6)),
                      rng.choice(PROBLEM) + ".", rng.choice(ASK)])
        while len(t) < 190:
            t += " " + rng.choice(vocab)
        out.append(t + " | " + rng.choice(["billing", "shipping", "account", "technical"]))
    return out


def run(n: int, threshold: float, num_perm: int) -> dict[str, float]:
    from tuneloop.data.dedup import NearDupIndex

    data = texts(n)
    ix = NearDupIndex(threshold, num_perm)
    t = time.perf_counter()
    sigs = [ix.signature(x) for x in data[: min(n, 5000)]]
    sig_us = (time.perf_counter() - t) / len(sigs) * 1e6
    block = min(n, 10_000)
    marks = []
    t = time.perf_counter()
    found = 0
    for i, x in enumerate(data):
        if i % block == 0:
            marks.append(time.perf_counter())
        sig = ix.signature(x)
        if ix.match(sig):
            found += 1
        else:
            ix.add(str(i), sig)
    end = time.perf_counter()
    marks.append(end)
    second, last = (marks[2] - marks[1], marks[-1] - marks[-2]) if len(marks) > 3 else (1.0, 1.0)
    return {"n": n, "s": end - t, "us_per_record": (end - t) / n * 1e6, "signature_us": sig_us, "found": found,
            "last_over_second": last / second}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="index sizes to time")
    ap.add_argument("--threshold", type=float, default=0.85, help="Jaccard threshold (data.dedup.near_threshold)")
    ap.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (data.dedup.num_perm)")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; threshold {args.threshold}, "
          f"{args.num_perm} permutations, character 5-grams")
    sizes = sorted(args.sizes)
    results = [min((run(sizes[0], args.threshold, args.num_perm) for _ in range(3)), key=lambda r: r["s"])]
    results += [run(n, args.threshold, args.num_perm) for n in sizes[1:]]
    for r in results:
        inner = f"; last 10k records cost x{r['last_over_second']:.2f} the second 10k" if r["n"] >= 40_000 else ""
        print(f"N={r['n']:>7}: {r['s']:6.1f} s, {r['us_per_record']:6.0f} us/record (signature alone "
              f"{r['signature_us']:.0f} us), {r['found']} near-duplicates found, per-record cost "
              f"x{r['us_per_record'] / results[0]['us_per_record']:.2f} of N={results[0]['n']}{inner}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    last = " ".join(f"near_dup_s_{r['n']}={r['s']:.1f}" for r in results)
    print(f"{last} scaling={results[-1]['us_per_record'] / results[0]['us_per_record']:.2f}")


if __name__ == "__main__":
    main()
