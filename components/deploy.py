from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from tuneloop.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(config: dict, parent_run_id: str, adapter: Input[Model], evaluation: Input[Model],
             dataset: Input[Dataset], model_card: Output[Markdown]) -> str:
    """Register the adapter in MLflow with lineage tags and a model card (alias challenger); idempotent."""
    from pathlib import Path

    from tuneloop.config import parse_config
    from tuneloop.stages import register_stage

    r = register_stage(parse_config(config), parent_run_id, Path(adapter.path), Path(evaluation.path),
                       Path(dataset.path))
    Path(model_card.path).write_text(r["model_card"])
    return r["version"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy_canary(config: dict, parent_run_id: str, version: str) -> float:
    """Serve the version to the configured share of users (alias canary); returns the deploy time."""
    from tuneloop.config import parse_config
    from tuneloop.stages import deploy_canary_stage

    return deploy_canary_stage(parse_config(config), parent_run_id, version)["deployed_at"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def analyze_canary(config: dict, parent_run_id: str, version: str, deployed_at: float,
                   report: Output[Markdown]) -> NamedTuple("Outputs", [("decision", str)]):
    """Compare canary with champion over the window (errors, p95 latency, feedback): promote or rollback."""
    import collections
    import tempfile
    from pathlib import Path

    from tuneloop.config import parse_config
    from tuneloop.stages import analyze_canary_stage

    r = analyze_canary_stage(parse_config(config), parent_run_id, version, deployed_at, Path(tempfile.mkdtemp()))
    Path(report.path).write_text(r["markdown"])
    return collections.namedtuple("Outputs", ["decision"])(r["decision"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(config: dict, parent_run_id: str, version: str):
    """Move aliases (previous <- champion <- canary) and all traffic to the new version."""
    from tuneloop.config import parse_config
    from tuneloop.stages import promote_stage

    promote_stage(parse_config(config), parent_run_id, version)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def rollback(config: dict, parent_run_id: str, version: str):
    """Take the canary out of serving; the champion keeps all traffic."""
    from tuneloop.config import parse_config
    from tuneloop.stages import rollback_stage

    rollback_stage(parse_config(config), parent_run_id, version)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def stop(config: dict, parent_run_id: str, reason: str):
    """A gate said no: close the MLflow parent run with the reason."""
    from tuneloop.config import parse_config
    from tuneloop.stages import stop_stage

    stop_stage(parse_config(config), parent_run_id, reason)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finalize(config: dict, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: after a failed or cancelled run, roll back its live canary and close its MLflow runs
    with the reason; a run that reached its decision is left as it is."""
    from tuneloop.config import parse_config
    from tuneloop.stages import finalize_stage

    return finalize_stage(parse_config(config), kfp_run_id, status.state, status.error_message or "")["outcome"]
