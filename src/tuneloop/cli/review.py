"""`tuneloop review`: human review of candidate answers (export a sample, import ratings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneloop.cli.shared import Group, app, console, fail

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
) -> None:
    """Export a stratified sample of candidate answers with the rubric (helpfulness, harmlessness, honesty; 1-5)."""
    from tuneloop.evaluate.review import export_sample

    try:
        counts = export_sample(predictions, out, per_slice, rater, seed)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e), 2)
    console.print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" items x {len(rater)} raters")


@review_app.command("import")
def review_import(
    ratings: Annotated[list[Path], typer.Argument(help="Filled CSV file(s) from `tuneloop review export`.")],
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


