"""What every config section shares: the strict base model, the error type, the metric vocabulary."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

DEFAULT_STATE_DIR = ".tuneloop"
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "exact_match": True, "token_f1": True, "rouge_l": True,
                    "nll": False, "perplexity": False, "cost": False, "unsafe_share": False, "win_rate": True,
                    "over_refusal": False}
CLASSIFICATION_METRICS = {"accuracy", "macro_f1", "cost"}
GENERATION_METRICS = {"over_refusal"}  # of a generation slice only
SAFETY_SLICE, PREFERENCE_SLICE = "safety", "preference"  # pseudo-slices of the evaluate stage
AUDIT_SUFFIX = "-audit"  # <classification slice>-audit: its human-rated production requests (evaluate.audit)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

