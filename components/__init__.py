"""tuneloop's KFP components: one thin adapter per pipeline stage (importable as tuneloop.components).

Each component has a typed signature, a docstring, and calls ONE function in
`tuneloop.stages`; logic never lives here. Images follow the package version (see IMAGE).
"""

from tuneloop.components.data import ingest, validate_data
from tuneloop.components.deploy import analyze_canary, deploy_canary, finalize, promote, register, rollback, stop
from tuneloop.components.evaluate import evaluate, merge, repair
from tuneloop.components.prerequisites import check_prerequisites
from tuneloop.components.train import dpo, reward, rl, sft

__all__ = ["analyze_canary", "check_prerequisites", "deploy_canary", "dpo", "evaluate", "finalize", "ingest", "merge",
           "promote", "register", "repair", "reward", "rl", "rollback", "sft", "stop", "validate_data"]
