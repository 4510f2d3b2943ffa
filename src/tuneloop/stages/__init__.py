"""The pipeline's stages as plain functions: one per KFP component, callable without KFP.

Each takes the validated config, the MLflow parent run id and local folders (KFP artifact
paths, or any folder from Python, the CLI or a test), runs inside its own nested MLflow run,
and returns a small dict. Big inputs travel by path: the base model is materialised once in
the state directory and read from there.

MLflow tells the story: each stage run's description says what it decided and why, verdicts are
tags and metrics a runs table shows (tuneloop.data_gate, tuneloop.gate, tuneloop.canary,
gate_passed, ...), and the pipeline run's description is the run summary, rewritten after every
stage and when the run closes - finished, failed, or found abandoned by a later run.
"""

from __future__ import annotations

import atexit
import gc

from tuneloop.stages.common import PrerequisiteError, base_model_dir
from tuneloop.stages.data import check_prerequisites, ingest_stage, log_data_lineage, validate_stage
from tuneloop.stages.evaluate import evaluate_stage, register_stage
from tuneloop.stages.repair import merge_stage, repair_stage
from tuneloop.stages.rollout import analyze_canary_stage, deploy_canary_stage, promote_stage, rollback_stage, stop_stage
from tuneloop.stages.story import close_abandoned_runs, finalize_stage, tell_story
from tuneloop.stages.train import dpo_stage, reward_stage, rl_stage, sft_stage

# Each pipeline task is a fresh interpreter that exits right after its stage, and its last cyclic garbage
# collection walks every object of the ~3,000 modules it loaded (1-2 s here). Frozen at exit, they are
# skipped by that walk; reference counting still releases them as the modules are torn down.
atexit.register(gc.freeze)

__all__ = ["PrerequisiteError", "analyze_canary_stage", "base_model_dir",
           "check_prerequisites", "close_abandoned_runs", "deploy_canary_stage", "dpo_stage", "evaluate_stage",
           "finalize_stage", "ingest_stage", "log_data_lineage", "merge_stage", "promote_stage", "register_stage",
           "repair_stage", "reward_stage", "rl_stage", "rollback_stage", "sft_stage", "stop_stage", "tell_story",
           "validate_stage"]
