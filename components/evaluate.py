from typing import NamedTuple

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from tuneloop.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def evaluate(config: dict, parent_run_id: str, dataset: Input[Dataset], adapter: Input[Model],
             evaluation: Output[Model], metrics: Output[Metrics], confusion: Output[ClassificationMetrics],
             report: Output[Markdown]) -> NamedTuple("Outputs", [("passed", bool)]):
    """Candidate vs champion per slice on held-out data; the gate decision is in evaluation/gate.json."""
    import collections
    import logging
    from pathlib import Path

    from tuneloop.config import parse_config
    from tuneloop.stages import evaluate_stage

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    r = evaluate_stage(parse_config(config), parent_run_id, Path(dataset.path), Path(adapter.path),
                       Path(evaluation.path))
    for who in ("candidate", "champion"):
        for name, value in r["headline"][who].items():
            metrics.log_metric(f"{who}.{name}", value)
    for cm in r["confusion"][:1]:
        confusion.log_confusion_matrix(cm["labels"], cm["matrix"])
    Path(report.path).write_text((Path(evaluation.path) / "report.md").read_text())
    return collections.namedtuple("Outputs", ["passed"])(r["passed"])
