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


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def merge(config: dict, parent_run_id: str, dataset: Input[Dataset], candidate: Input[Model], adapter: Output[Model]):
    """train.merge.enabled: the candidate merged with the champion's adapter (peft: linear, TIES, DARE-TIES; weights
    chosen on a tuning split that is never the gate's data); otherwise the candidate passed through."""
    import logging
    from pathlib import Path

    from tuneloop.config import parse_config
    from tuneloop.stages import merge_stage

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    merge_stage(parse_config(config), parent_run_id, Path(dataset.path), Path(candidate.path), Path(adapter.path))


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def repair(config: dict, parent_run_id: str, dataset: Input[Dataset], candidate: Input[Model],
           evaluation: Input[Model], adapter: Output[Model], final_evaluation: Output[Model],
           final_dataset: Output[Dataset], report: Output[Markdown]) -> NamedTuple("Outputs", [("passed", bool)]):
    """A candidate blocked only for forgetting old slices goes up the repair ladder (merge, replay, EWC, lower
    learning rate, each gated like the first); the outputs are what register takes (the first candidate's when
    it passed, the repaired one's otherwise), `report` lists every attempt."""
    import collections
    import logging
    from pathlib import Path

    from tuneloop.config import parse_config
    from tuneloop.stages import repair_stage

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    r = repair_stage(parse_config(config), parent_run_id, Path(dataset.path), Path(candidate.path),
                     Path(evaluation.path), Path(adapter.path), Path(final_evaluation.path), Path(final_dataset.path))
    ladder = Path(adapter.path) / "record" / "ladder.md"
    Path(report.path).write_text(ladder.read_text() if ladder.exists() else r["outcome"])
    return collections.namedtuple("Outputs", ["passed"])(r["passed"])
