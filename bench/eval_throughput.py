"""Evaluation speed: scoring (reference NLL + greedy answer) of N eval prompts with a tiny model,
batched as the evaluate stage does it vs one prompt at a time (the baseline, same run).

    python bench/eval_throughput.py [--prompts 1000] [--batch-size 16] [--max-new-tokens 8]

Last line: `prompts_per_s=<batched> batched_speedup=<batched / one-at-a-time>`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=1000, help="eval prompts scored")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per batch (evaluate.batch_size)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="generation budget per prompt")
    ap.add_argument("--baseline-prompts", type=int, default=100,
                    help="prompts scored one at a time for the baseline (rate extrapolated)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from tuneloop.data.formatting import ChatFormatter
    from tuneloop.evaluate.scoring import score_records
    from tuneloop.jsonl import read_jsonl
    from tuneloop.models import load_causal_lm
    from tuneloop.tiny import DEMO_DATA, build_tiny_model

    model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "m")
    model, tok = load_causal_lm(model_dir)
    fmt = ChatFormatter(tok)
    raw = [r for f in sorted((DEMO_DATA / "eval").glob("*.jsonl")) for r in read_jsonl(f)]
    records = [{"id": f"r{i}", "slice": r["slice"], "prompt": fmt.user_prompt(r["prompt"]),
                "completion": fmt.completion(r["response"]), "user_text": r["prompt"], "response": r["response"]}
               for i, r in enumerate(raw[i % len(raw)] for i in range(args.prompts))]
    t0 = time.perf_counter()
    score_records(model, tok, records, args.batch_size, args.max_new_tokens)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_records(model, tok, records[:args.baseline_prompts], 1, args.max_new_tokens)
    single = (time.perf_counter() - t0) * args.prompts / args.baseline_prompts
    print(f"{args.prompts} prompts: batched (batch {args.batch_size}) {batched:.1f} s; one at a time "
          f"{single:.1f} s (extrapolated from {args.baseline_prompts})")
    print(f"prompts_per_s={args.prompts / batched:.1f} batched_speedup={single / batched:.2f}")


if __name__ == "__main__":
    main()
