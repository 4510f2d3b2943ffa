"""`tuneloop review`: human review of candidate answers (export a sample, import ratings) and the audit of
production answers; `tuneloop labels import`: ground truth that arrives late."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneloop.cli.shared import ConfigArg, Group, StateDir, TrackingUri, app, console, fail, load

review_app = typer.Typer(help="Human review of candidate answers: export a sample, import ratings.",
                         no_args_is_help=True, cls=Group)
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(
    predictions: Annotated[Path, typer.Option(help="predictions.jsonl written by the evaluate stage.")],
    out: Annotated[Path, typer.Option(help="CSV to hand to the raters (one row per item and rater).")],
    per_slice: Annotated[int, typer.Option(help="Items sampled from every slice.")] = 10,
    rater: Annotated[list[str], typer.Option(help="Rater id; repeat for each rater (at least two).")] = ["a", "b"],
    seed: Annotated[int, typer.Option(help="Seed of the stratified sample.")] = 0,
    format: Annotated[str, typer.Option(help="csv: one row per item and rater; label-studio: one Label Studio "
                                             "task per item (OUT, JSON) and its labeling config (OUT with .xml), "
                                             "whose JSON export `review import` reads.")] = "csv",
) -> None:
    """Export a stratified sample of candidate answers with the rubric (helpfulness, harmlessness, honesty; 1-5)."""
    from tuneloop.evaluate.review import export_sample

    if format not in ("csv", "label-studio"):
        fail(f"--format {format!r}: csv or label-studio", 2)
    try:
        counts = export_sample(predictions, out, per_slice, rater, seed, fmt=format)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e), 2)
    console.print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" items x {len(rater)} raters")


@review_app.command("import")
def review_import(
    ratings: Annotated[list[Path], typer.Argument(help="Filled CSV file(s) from `tuneloop review export`, or "
                                                       "Label Studio JSON exports of its label-studio tasks.")],
    min_kappa: Annotated[float, typer.Option(help="Refuse the ratings when agreement on any rubric dimension "
                                                  "(Cohen's / Fleiss' kappa) is below this.")] = 0.4,
    out: Annotated[Path | None, typer.Option(help="Write the summary (agreement, mean scores per slice) as JSON.")]
    = None,
) -> None:
    """Import ratings, check inter-rater agreement, and summarise the scores per slice."""
    import json

    from tuneloop.evaluate.review import ReviewRejected, import_ratings

    try:
        summary = import_ratings(ratings, min_kappa)
    except (ReviewRejected, FileNotFoundError) as e:
        fail(str(e), 3)
    for dim, a in summary["agreement"].items():
        console.print(f"{dim}: {a['statistic']} kappa {a['kappa']:.3f}")
    if out:
        out.write_text(json.dumps(summary, indent=2))
        console.print(f"wrote {out}")




@review_app.command("audit-export")
def review_audit_export(
    slice: Annotated[str, typer.Option(help="Classification slice to audit.")],
    out: Annotated[Path, typer.Option(help="File for the raters: CSV, or Label Studio tasks (JSON) with the "
                                           "labeling config next to it (.xml).")],
    config: ConfigArg = None, state_dir: StateDir = None, tracking_uri: TrackingUri = None,
    n: Annotated[int, typer.Option(help="Requests sampled (uniformly at random from the window).")] = 100,
    format: Annotated[str, typer.Option(help="csv or label-studio.")] = "csv",
    rater: Annotated[list[str], typer.Option(help="Rater id (csv: one row per request and rater); repeat for "
                                                  "more.")] = ["a"],
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
) -> None:
    """Export a random sample of the champion's production answers of a classification slice for raters to
    label. Import the labels with `tuneloop labels import FILE --source audit`; the monitor then combines them
    with its label-free estimate over all traffic (prediction-powered inference)."""
    import time

    from tuneloop.evaluate.calibration import classification_labels
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.monitor.audit import audit_sample, write_audit
    from tuneloop.registry import Registry

    cfg = load(config, state_dir, tracking_uri)
    labels = classification_labels(cfg.evaluate)
    if slice not in labels:
        fail(f"--slice {slice!r}: one of the classification slices {', '.join(labels) or '(none configured)'}", 2)
    if format not in ("csv", "label-studio") or n < 1:
        fail("give --format csv|label-studio and --n >= 1", 2)
    champ = Registry(cfg).alias_version("champion")
    now = time.time()
    rows = audit_sample(FeedbackStore(cfg.feedback_db), str(champ.version) if champ else "base", slice,
                        now - cfg.monitor.window_hours * 3600, now, n, seed)
    write_audit(rows, labels[slice], out, format, rater)
    console.print(f"wrote {out}: {len(rows)} requests of slice {slice} from the last {cfg.monitor.window_hours:g} h"
                  + (f" (labeling config {out.with_suffix('.xml')})" if format == "label-studio" else ""))


labels_app = typer.Typer(help="Ground truth that arrives after the answer: import it for the monitor.",
                         no_args_is_help=True, cls=Group)
app.add_typer(labels_app, name="labels")


@labels_app.command("import")
def labels_import(
    file: Annotated[Path, typer.Argument(help="CSV or JSONL with request_id and label (and optionally rater), or "
                                              "a Label Studio JSON export of `review audit-export` tasks.")],
    config: Annotated[Path | None, typer.Option("--config", help="Run config YAML; default: the embedded demo "
                                                                 "config.")] = None,
    state_dir: StateDir = None,
    source: Annotated[str, typer.Option(help="import: labels from elsewhere (realized quality and SLOs); audit: "
                                             "ratings of a `review audit-export` sample (also the human sample "
                                             "of the PPI interval).")] = "import",
) -> None:
    """Import true labels keyed by request id; `tuneloop monitor` reports realized accuracy, precision and
    recall per slice and label from them, next to its estimate, and checks the quality SLOs.

    Exit 0: every labelled row stored; 1: some refused, each named (the others are stored); 2: unreadable."""
    from tuneloop.evaluate.calibration import classification_labels
    from tuneloop.feedback.store import FeedbackStore
    from tuneloop.monitor.labels import SOURCES, import_labels, read_label_file

    if source not in SOURCES:
        fail(f"--source {source!r}: one of {', '.join(SOURCES)}", 2)
    cfg = load(config, state_dir)
    try:
        rows = read_label_file(file)
    except (OSError, ValueError) as e:
        fail(str(e), 2)
    r = import_labels(FeedbackStore(cfg.feedback_db), rows, classification_labels(cfg.evaluate), source)
    for where, why in r["refused"][:20]:
        typer.echo(f"refused: {where}: {why}", err=True)
    if len(r["refused"]) > 20:
        typer.echo(f"refused: ... and {len(r['refused']) - 20} more", err=True)
    console.print(f"{file}: {r['stored']} labels stored (source {source}), {r['unrated']} rows without a label, "
                  f"{len(r['refused'])} refused")
    if r["refused"]:
        raise typer.Exit(1)
