from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Output

from tuneloop.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(config: dict, parent_run_id: str, dataset: Output[Dataset]):
    """Sources (+ replay of the champion's data, + feedback store) -> PII-scrubbed, deduplicated, formatted
    SFT records, preference pairs, eval set, quarantine, report with lineage counts."""
    import logging
    from pathlib import Path

    from tuneloop.config import parse_config
    from tuneloop.stages import ingest_stage

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    r = ingest_stage(parse_config(config), parent_run_id, Path(dataset.path))
    dataset.metadata.update({"data_hash": r["data_hash"], "accepted": r["accepted"], "quarantined": r["quarantined"],
                             "pii_replaced": sum(r["pii"]["entities"].values()), "replayed": r["replay"]["accepted"]})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_data(config: dict, parent_run_id: str, dataset: Input[Dataset], report: Output[Markdown],
                  drift_report: Output[HTML]) -> NamedTuple("Outputs", [("passed", bool)]):
    """Great Expectations suite from the config (the run continues only if it passes), and the Evidently
    drift report against the champion's training data."""
    import collections
    import logging
    import tempfile
    from pathlib import Path

    from tuneloop.config import parse_config
    from tuneloop.stages import validate_stage

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    out = Path(tempfile.mkdtemp())
    r = validate_stage(parse_config(config), parent_run_id, Path(dataset.path), out)
    Path(report.path).write_text((out / "report.md").read_text())
    Path(drift_report.path).write_text(Path(r["drift_html"]).read_text())
    return collections.namedtuple("Outputs", ["passed"])(r["passed"])
