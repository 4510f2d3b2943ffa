from typing import NamedTuple

from kfp import dsl

from tuneloop.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def check_prerequisites(config: dict, run_name: str, kfp_run_id: str) -> NamedTuple("Outputs", [("parent_run_id", str)]):
    """Check data, base model, libraries and services before any compute; open the MLflow parent run."""
    import collections
    import logging

    from tuneloop.config import parse_config
    from tuneloop.stages import check_prerequisites as stage

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    r = stage(parse_config(config), run_name, kfp_run_id)
    return collections.namedtuple("Outputs", ["parent_run_id"])(r["parent_run_id"])
