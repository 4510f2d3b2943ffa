"""Ingest: sources + feedback store -> formatted SFT records, preference pairs and eval set.

Output folder (the `dataset` artifact of the pipeline):
    sft.jsonl          {id, slice, source, prompt, completion, user_text, response, turns}
    preference.jsonl   {id, slice, source, prompt, chosen, rejected, user_text}
    eval.jsonl         {id, slice, source, prompt, completion, user_text, response, turns}
    eval_preference.jsonl  held-out preference pairs (data.eval sources of kind preference)
    quarantine.jsonl   {source, row, reason, record} - every record not accepted, with its reason
    report.json        counts (read = accepted + quarantined, per reason/slice/source), content hash;
                       encodings (files not read as plain UTF-8), normalize (texts changed per step and
                       source), long_records (policy, limits, truncated/quarantined per source, ids)

`prompt`/`completion`/`chosen`/`rejected` are rendered with the base model's chat template
(see formatting.py); `user_text`/`response` keep the plain text for evaluation and reports,
`turns` the conversation before the answer (so the record can be rendered again, e.g. when
it is replayed into a later run). Without a formatter (`tuneloop ingest` with no tokenizer)
the rendered fields are left out.

Per record, in this order: read and decode (readers.py: the source's `encoding`), parse and
check the schema (sft: messages or prompt/response; classification: `template` filled from
the record's fields, the label as the answer; preference: prompt/chosen/rejected), with every
text field normalized first (normalize.py: HTML entities, NFC, control characters; counted per
source), scrub PII from every text (pii.py: Presidio behind a pre-filter; quarantined records
are scrubbed too, since the quarantine is logged), exact dedup on the normalized content, id
check, eval leak (exact prompt, then near-duplicate prompt), near-duplicate of an earlier
record of the same kind (dedup.py), length (training records longer than train.sft.max_length /
train.dpo.max_length tokens: quarantined, or with `data.long_records: truncate_prompt` their
prompt cut from the left), render, write. A record that fails a step is quarantined with the
reason; read = accepted + quarantined.

After the new SFT records, a share of the champion's training records is replayed
(replay.py) through the same steps, so replayed records are scrubbed, deduplicated against
the new data and checked against the current eval set like any other.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import reprlib
import string
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.config import DataConfig, DataSource, TrainConfig, template_fields
from tuneloop.data.formatting import ChatFormatter
from tuneloop.data.normalize import Normalizer
from tuneloop.data.pii import PiiScrubber
from tuneloop.data.readers import MAX_DEPTH, RawRecord, read_records, too_deep

log = logging.getLogger("tuneloop.ingest")

ROLES = {"system", "user", "assistant"}
_WS = re.compile(r"\s+")


class Rejected(ValueError):
    """A record that is quarantined; the message is the reason (names the field)."""


def normalize_text(s: str) -> str:
    return _WS.sub(" ", s.strip().lower())


def _text(rec: dict[str, Any], key: str, limit: int, clean: Callable[[str], str]) -> str:
    if key not in rec or rec[key] is None:
        raise Rejected(f"missing field `{key}`")
    v = rec[key]
    if not isinstance(v, str):
        raise Rejected(f"field `{key}` must be a string, got {type(v).__name__}")
    v = clean(v)
    if not v.strip():
        raise Rejected(f"field `{key}` is empty or whitespace")
    if len(v) > limit:
        raise Rejected(f"field `{key}` is too long ({len(v)} > {limit} characters)")
    return v.strip()


def _messages(rec: dict[str, Any], limit: int, clean: Callable[[str], str]) -> tuple[list[dict[str, str]], str]:
    msgs = rec["messages"]
    if isinstance(msgs, str):  # CSV/Parquet carry nested data as JSON text
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise Rejected("field `messages` is not a JSON list") from None
        except RecursionError:
            raise Rejected(f"field `messages` is nested too deeply (more than {MAX_DEPTH} levels)") from None
        if too_deep(msgs):
            raise Rejected(f"field `messages` is nested too deeply (more than {MAX_DEPTH} levels)")
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise Rejected("field `messages` must be a list of at least two turns")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise Rejected(f"field `messages[{i}].role` must be one of {sorted(ROLES)}")
        out.append({"role": m["role"], "content": _text(m, "content", limit, clean)})
    if out[-1]["role"] != "assistant":
        raise Rejected("field `messages`: the last turn must be the assistant's answer")
    return out[:-1], out[-1]["content"]


@dataclass
class Counts:
    read: int = 0
    accepted: int = 0
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)
    slices: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "accepted": self.accepted, "quarantined": self.quarantined,
                "per_reason": dict(self.reasons), "per_slice": dict(self.slices), "per_source": dict(self.sources)}


def _reason_key(reason: str) -> str:
    """Group reasons for counting: 'field `x` is too long (…)' -> 'field `x` is too long'."""
    if reason.startswith("exact duplicate of "):  # one group, not one per duplicated id
        return "exact duplicate"
    if reason.startswith("near duplicate of "):
        return "near duplicate"
    if reason.startswith("eval leak (near duplicate)"):
        return "eval leak (near duplicate)"
    return re.sub(r"\s*\(.*\)$|: .*$| at .*$", "", reason)


@dataclass(frozen=True)
class LengthPolicy:
    """What ingest does with training records longer than the training max_length: `policy` quarantine or
    truncate_prompt; `max_length` per record kind (sft, preference); `keys`: how messages name each limit
    and the policy (config keys for a pipeline run, flags for `tuneloop ingest`)."""

    policy: str
    max_length: dict[str, int]
    keys: dict[str, str]

    @classmethod
    def from_config(cls, data: DataConfig, train: TrainConfig) -> LengthPolicy:
        limits = {k: s.max_length for k, s in (("sft", train.sft), ("preference", train.dpo)) if s.enabled}
        return cls(data.long_records, limits, {"sft": "train.sft.max_length", "preference": "train.dpo.max_length",
                                               "policy": "data.long_records"})

    def too_long(self, kind: str, tokens: int) -> str:
        key, limit = self.keys[kind], self.max_length[kind]
        if self.keys["policy"].startswith("--"):
            return (f"too long for training: {tokens} tokens > {key} {limit} (raise {key}, or rerun with "
                    f"{self.keys['policy']} truncate_prompt to cut the prompt)")
        return (f"too long for training: {tokens} tokens > {key} {limit} (raise {key}, or set "
                f"{self.keys['policy']}: truncate_prompt to cut the prompt)")

    def answer_too_long(self, kind: str, tokens: int) -> str:
        key, limit = self.keys[kind], self.max_length[kind]
        return (f"too long for training even with its prompt cut: the answer with the least prompt takes "
                f"{tokens} tokens > {key} {limit} (raise {key})")


class RecordWriter:
    def __init__(self, out: Path, name: str) -> None:
        self.f = open(out / name, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.sha = hashlib.sha256()

    def write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False, default=str) + "\n"  # Parquet dates, bytes: as text
        self.f.write(line)
        self.sha.update(line.encode())

    def close(self) -> str:
        self.f.close()
        return self.sha.hexdigest()


class Ingestor:
    def __init__(self, cfg: DataConfig, formatter: ChatFormatter | None, out: Path,
                 scrubber: PiiScrubber | None = None, lengths: LengthPolicy | None = None,
                 source_key: Callable[[DataSource], str] | None = None) -> None:
        """`lengths`: the length policy (needs a formatter to count tokens); `source_key`: how messages name
        a source's settings (default: its place in cfg, data.sources[0])."""
        self.cfg, self.fmt, self.out = cfg, formatter, out
        out.mkdir(parents=True, exist_ok=True)
        self.pii = scrubber or PiiScrubber(cfg.pii)
        self.norm = Normalizer(cfg.normalize)
        self.lengths = lengths if formatter is not None else None
        self.long: dict[str, Counter] = {"truncated": Counter(), "quarantined": Counter()}  # per source
        self.long_examples: dict[str, list[str]] = {"truncated": [], "quarantined": []}
        self.encodings: dict[str, str] = {}  # file -> encoding, where not plain UTF-8
        self.source_key = source_key or self._config_key
        self.near: dict[str, Any] = {}  # record group -> NearDupIndex (built on first use)
        self.counts = {"sft": Counts(), "preference": Counts(), "eval": Counts(), "eval_preference": Counts()}
        self.quarantine = RecordWriter(out, "quarantine.jsonl")
        self.seen: dict[bytes, str] = {}  # normalized content hash (128 bits) -> id (exact dedup)
        self.eval_prompts: dict[str, str] = {}  # normalized eval prompt -> eval id (leak check)
        self.ids: set[str] = set()

    # -- one record --
    def _reject(self, kind: str, raw: RawRecord, reason: str, record: Any = None) -> None:
        c = self.counts[kind]
        c.quarantined += 1
        c.reasons[_reason_key(reason)] += 1
        original = record if record is not None else raw.data if raw.data is not None else raw.raw_text
        self.pii.discard()  # what parsing scrubbed is not written; the quarantined record is
        try:
            scrubbed = self.pii.scrub_value(original)
        except RecursionError:  # nested too deeply to copy: a bounded repr of it
            self.pii.discard()
            scrubbed = self.pii.scrub(reprlib.repr(original))
        self.quarantine.write({"kind": kind, "source": raw.source, "row": raw.row, "reason": reason,
                               "record": scrubbed})
        self.pii.commit("quarantined")

    def _config_key(self, src: DataSource) -> str:
        """data.sources[i] / data.eval[i]: where `src` is in the config (messages name its settings)."""
        for name in ("sources", "eval"):
            for i, s in enumerate(getattr(self.cfg, name)):
                if s is src:
                    return f"data.{name}[{i}]"
        return ""

    def _id(self, rec: dict[str, Any], raw: RawRecord, content: str) -> str:
        rid = rec.get("id")
        if rid is not None and not isinstance(rid, (str, int)):
            raise Rejected(f"field `id` must be a string or integer, got {type(rid).__name__}")
        if rid is None or str(rid).strip() == "":
            rid = "h-" + hashlib.sha256(f"{Path(raw.source).name}\0{content}".encode()).hexdigest()[:16]
        rid = str(rid)
        if rid in self.ids:
            raise Rejected(f"field `id`: duplicate id {rid!r}")
        return rid

    def _slice(self, rec: dict[str, Any], src: DataSource) -> str:
        s = rec.get("slice") or src.slice or "default"
        if not isinstance(s, str):
            raise Rejected(f"field `slice` must be a string, got {type(s).__name__}")
        return s

    def _sft(self, rec: dict[str, Any], raw: RawRecord, src: DataSource) -> dict[str, Any]:
        limit_p, limit_r, clean = self.cfg.max_prompt_chars, self.cfg.max_response_chars, self.norm.clean
        body = None
        if src.kind == "classification":
            user_text, response, body = _classification(rec, src, limit_p, clean)
            turns = [{"role": "user", "content": user_text}]
        elif "messages" in rec:
            turns, response = _messages(rec, max(limit_p, limit_r), clean)
            user_text = next((t["content"] for t in reversed(turns) if t["role"] == "user"), "")
        else:
            user_text = _text(rec, "prompt", limit_p, clean)
            response = _text(rec, "response", limit_r, clean)
            turns = [{"role": "user", "content": user_text}]
        turns = [{**t, "content": self.pii.scrub(t["content"])} for t in turns]
        user_text = next((t["content"] for t in reversed(turns) if t["role"] == "user"), "")
        return {"slice": self._slice(rec, src), "source": raw.source, "user_text": user_text,
                "response": self.pii.scrub(response), "turns": turns, "_body": body}

    def _pref(self, rec: dict[str, Any], raw: RawRecord, src: DataSource) -> dict[str, Any]:
        lim, clean = self.cfg.max_response_chars, self.norm.clean
        user_text = _text(rec, "prompt", self.cfg.max_prompt_chars, clean)
        chosen, rejected = _text(rec, "chosen", lim, clean), _text(rec, "rejected", lim, clean)
        if chosen == rejected:  # case or punctuation differences are real preferences (formatting)
            raise Rejected("fields `chosen` and `rejected` are the same answer")
        chosen, rejected = self.pii.scrub(chosen), self.pii.scrub(rejected)
        if chosen == rejected:  # they differed only in PII
            raise Rejected("fields `chosen` and `rejected` are the same answer once PII is replaced")
        return {"slice": self._slice(rec, src), "source": raw.source, "user_text": self.pii.scrub(user_text),
                "chosen": chosen, "rejected": rejected}

    def _fit(self, kind: str, rid: str, source: str, r: dict[str, Any], body: tuple[str, str] | None
             ) -> dict[str, Any]:
        """The length policy: a training record longer than its max_length is quarantined (Rejected) or,
        with truncate_prompt, gets its prompt cut from the left (the answer stays whole): a new dict."""
        lp = self.lengths
        if lp is None or self.fmt is None or kind not in lp.max_length:
            return r
        pref = "chosen" in r
        turns = [{"role": "user", "content": r["user_text"]}] if pref else r["turns"]
        answers = [self.fmt.completion(r[a]) for a in (("chosen", "rejected") if pref else ("response",))]
        fit = self.fmt.fit(turns, answers, lp.max_length[kind], body, cut=lp.policy == "truncate_prompt")
        if fit.turns is None:
            self._long("quarantined", rid, source)
            raise Rejected(lp.too_long(kind, fit.tokens or 0) if lp.policy == "quarantine" else
                           lp.answer_too_long(kind, fit.fitted_tokens or 0))
        if not fit.cut:
            return r
        user_text = next((t["content"] for t in reversed(fit.turns) if t["role"] == "user"), "")
        return {**r, "user_text": user_text} if pref else {**r, "user_text": user_text, "turns": fit.turns}

    def _long(self, what: str, rid: str, source: str) -> None:
        self.long[what][_source_name(source)] += 1
        if len(self.long_examples[what]) < 5:
            self.long_examples[what].append(rid)

    def long_report(self) -> dict[str, Any]:
        lp = self.lengths
        rep: dict[str, Any] = {"policy": lp.policy if lp else self.cfg.long_records,
                               "max_length": dict(lp.max_length) if lp else {},
                               **{k: sum(c.values()) for k, c in self.long.items()},
                               "per_source": {s: {k: self.long[k][s] for k in self.long}
                                              for s in sorted(set().union(*self.long.values()))},
                               "examples": self.long_examples}
        if lp is None:
            rep["note"] = "token lengths not checked (no tokenizer or no training config)"
        return rep

    def _render(self, r: dict[str, Any]) -> dict[str, Any]:
        """Chat-template fields (with a formatter); turns and plain texts stay for later stages."""
        if self.fmt is None:
            return r
        if "chosen" in r:
            return {**r, "prompt": self.fmt.user_prompt(r["user_text"]), "chosen": self.fmt.completion(r["chosen"]),
                    "rejected": self.fmt.completion(r["rejected"])}
        return {**r, "prompt": self.fmt.prompt(r["turns"]), "completion": self.fmt.completion(r["response"])}

    def _near(self, group: str) -> Any:
        if group not in self.near:
            from tuneloop.data.dedup import NearDupIndex

            self.near[group] = NearDupIndex(self.cfg.dedup.near_threshold, self.cfg.dedup.num_perm)
        return self.near[group]

    def _near_dup(self, kind: str, r: dict[str, Any]) -> Any:
        """Near-duplicate checks (eval leak by prompt, then an earlier record of this kind); returns
        what to index once the record is accepted."""
        if self.cfg.dedup.near_threshold <= 0:
            return None
        long_prompt = len(normalize_text(r["user_text"])) >= self.cfg.dedup.min_chars
        if kind.startswith("eval"):
            return ("eval", self._near("eval").signature(r["user_text"])) if long_prompt else None
        if "eval" in self.near and long_prompt:
            hit = self.near["eval"].match(self.near["eval"].signature(r["user_text"]))
            if hit:
                raise Rejected(f"eval leak (near duplicate): prompt resembles held-out eval record {hit[0]} "
                               f"(jaccard {hit[1]:.2f})")
        group = "preference" if "chosen" in r else "sft"
        text = "\n".join([r["user_text"], *([r["chosen"], r["rejected"]] if "chosen" in r else [r["response"]])])
        if len(normalize_text(text)) < self.cfg.dedup.min_chars:
            return None
        sig = self._near(group).signature(text)
        hit = self.near[group].match(sig)
        if hit:
            raise Rejected(f"near duplicate of {hit[0]} (jaccard {hit[1]:.2f})")
        return (group, sig)

    def _content_key(self, kind: str, r: dict[str, Any]) -> str:
        parts = [kind, normalize_text(r["user_text"])]
        parts += [normalize_text(r["response"])] if "chosen" not in r else \
            [normalize_text(r["chosen"]), normalize_text(r["rejected"])]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def add(self, kind: str, raw: RawRecord, src: DataSource, writer: RecordWriter) -> None:
        c = self.counts[kind]
        c.read += 1
        if raw.data is None:
            self._reject(kind, raw, raw.problem or "unreadable")
            return
        self.norm.source = _source_name(raw.source)
        try:
            r = self._pref(raw.data, raw, src) if kind.endswith("preference") else self._sft(raw.data, raw, src)
            body = r.pop("_body", None)
            key = self._content_key(kind, r)
            short = bytes.fromhex(key[:32])  # 128 bits: ~50 bytes a record instead of ~110
            if short in self.seen:  # before the id: an id-less duplicate gets the same content id
                raise Rejected(f"exact duplicate of {self.seen[short]}")
            rid = self._id(raw.data, raw, key)
            if not kind.startswith("eval") and normalize_text(r["user_text"]) in self.eval_prompts:
                raise Rejected(f"eval leak: prompt is held-out eval record {self.eval_prompts[normalize_text(r['user_text'])]}")
            index = self._near_dup(kind, r)
            fitted = self._fit(kind, rid, raw.source, r, body)
            if fitted is not r:  # a cut prompt can make two records the same: dedup what is trained
                key = self._content_key(kind, fitted)
                if bytes.fromhex(key[:32]) in self.seen:
                    raise Rejected(f"exact duplicate of {self.seen[bytes.fromhex(key[:32])]} once its prompt was "
                                   "cut to fit")
                self.seen[bytes.fromhex(key[:32])] = rid
                self._long("truncated", rid, raw.source)
                r = fitted
        except Rejected as e:
            self._reject(kind, raw, str(e))
            return
        except RecursionError:  # a structure nested too deeply for the steps above (readers bound JSONL)
            self._reject(kind, raw, f"record nested too deeply (more than {MAX_DEPTH} levels)")
            return
        if index is not None:
            self.near[index[0]].add(rid, index[1])
        self.pii.commit("accepted")
        self.seen[short] = rid
        self.ids.add(rid)
        if kind.startswith("eval"):
            self.eval_prompts[normalize_text(r["user_text"])] = rid
        c.accepted += 1
        c.slices[r["slice"]] += 1
        c.sources[_source_name(raw.source)] += 1
        writer.write({"id": rid, **self._render(r)})

    def add_all(self, kind: str, sources: Iterable[DataSource], writer: Any, kinds: str | None = None) -> None:
        """Every record of `sources` as `kind`; kinds auto (`tuneloop ingest`): a record with chosen or
        rejected is a preference pair (writer then maps a kind to its writer)."""
        for src in sources:
            for raw in read_records(src.path, src.format, src.storage_options, src.encoding, self.source_key(src),
                                    self.encodings):
                k = kind
                if kinds == "auto" and raw.data is not None and ("chosen" in raw.data or "rejected" in raw.data):
                    k = "preference"
                self.add(k, raw, src, writer[k] if isinstance(writer, dict) else writer)

    def reports(self) -> dict[str, Any]:
        """The per-step parts of the ingest report: decoding, normalization, length, PII, dedup."""
        return {"encodings": dict(self.encodings), "normalize": self.norm.report(), "long_records": self.long_report(),
                "pii": self.pii.report(), "dedup": self.dedup_report()}

    def dedup_report(self) -> dict[str, Any]:
        reasons = sum((c.reasons for c in self.counts.values()), Counter())
        return {"exact_duplicates": reasons["exact duplicate"], "near_duplicates": reasons["near duplicate"],
                "eval_leaks_exact": reasons["eval leak"], "eval_leaks_near": reasons["eval leak (near duplicate)"],
                "near_threshold": self.cfg.dedup.near_threshold,
                "indexed": {g: len(ix) for g, ix in self.near.items()}}


@functools.lru_cache(maxsize=4096)
def _source_name(source: str) -> str:
    return source if source.startswith("replay:") else Path(source.split("://", 1)[-1]).name


def _classification(rec: dict[str, Any], src: DataSource, limit: int, clean: Callable[[str], str]
                    ) -> tuple[str, str, tuple[str, str]]:
    """A text + label record -> (instruction from the source's template, label, (prefix, suffix)): the
    instruction around its longest field, which a length policy keeps while it cuts that field."""
    template = src.template or ""
    values = {name: _text(rec, name, limit, clean) for name in template_fields(template)}
    prompt = template.format_map(values)
    if len(prompt) > limit:
        raise Rejected(f"field `{next(iter(values))}` is too long once put in the template "
                       f"({len(prompt)} > {limit} characters)")
    label = rec.get(src.label_field)
    if label is None:
        raise Rejected(f"missing field `{src.label_field}`")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise Rejected(f"field `{src.label_field}` must be a string or integer, got {type(label).__name__}")
    label = clean(str(label)).strip()
    if not label:
        raise Rejected(f"field `{src.label_field}` is empty or whitespace")
    longest = max(values, key=lambda k: len(values[k]))
    parts: list[list[str]] = [[], []]  # before and after the first {longest}
    side = 0
    for literal, name, _, _ in string.Formatter().parse(template):
        parts[side].append(literal)
        if name is not None:
            if side == 0 and name == longest:
                side = 1
            else:
                parts[side].append(values[name])
    return prompt, label, ("".join(parts[0]), "".join(parts[1]))


def ingest(cfg: DataConfig, formatter: ChatFormatter | None, out: Path,
           feedback_rows: list[dict[str, Any]] | None = None, champion: Any = None,
           train: TrainConfig | None = None, audit: list[dict[str, Any]] | None = None,
           audit_stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ingest into `out`; returns the report (also written to out/report.json).

    `audit` (monitor.labels.audit_examples): rated production requests, added to the eval set as slice
    `<slice>-audit` after data.eval's records (checked like them: a training record with the same prompt is then
    an eval leak); `audit_stats` (how they were read: rated, tied, ...) joins the report's `audit`.

    `champion` (replay.ChampionData or None) is the replay pool for `cfg.replay_share`. `train` (the run's
    training section) gives the token limits of `cfg.long_records` (train.sft.max_length for SFT records,
    train.dpo.max_length for preference pairs); they are applied when there is a formatter to count tokens."""
    ing = Ingestor(cfg, formatter, out, lengths=LengthPolicy.from_config(cfg, train) if train else None)
    writers = {k: RecordWriter(out, f"{k}.jsonl") for k in ("eval", "eval_preference", "sft", "preference")}
    # Eval first: its prompts are what training data must not leak.
    ing.add_all("eval", [s for s in cfg.eval if s.kind != "preference"], writers["eval"])
    ing.add_all("eval_preference", [s for s in cfg.eval if s.kind == "preference"], writers["eval_preference"])
    audit_counts = {**_audit(ing, audit or [], writers["eval"]), **(audit_stats or {})}
    ing.add_all("sft", [s for s in cfg.sources if s.kind != "preference"], writers["sft"])
    ing.add_all("preference", [s for s in cfg.sources if s.kind == "preference"], writers["preference"])
    fb_counts = {"rows": 0, "sft": 0, "preference": 0, "no_pair_empty_output": 0, "corrections_trusted": 0,
                 "corrections_untrusted": 0}
    if feedback_rows:
        from tuneloop.data.feedback import feedback_to_training

        fb_stats: dict[str, int] = {}
        fb_sft, fb_pairs = feedback_to_training(feedback_rows, fb_stats)
        fb_counts = {"rows": len(feedback_rows), "sft": len(fb_sft), "preference": len(fb_pairs), **fb_stats}
        src = DataSource(path="feedback-store", slice="feedback")
        for i, rec in enumerate(fb_sft, 1):
            ing.add("sft", RawRecord("feedback-store", i, rec), src, writers["sft"])
        for i, rec in enumerate(fb_pairs, 1):
            ing.add("preference", RawRecord("feedback-store", i, rec), src, writers["preference"])
    replay = _replay(ing, cfg, champion, writers["sft"])
    hashes = {k: w.close() for k, w in writers.items()}
    ing.quarantine.close()
    data_hash = hashlib.sha256((hashes["sft"] + hashes["preference"]).encode()).hexdigest()
    totals = {k: sum(getattr(c, k) for c in ing.counts.values()) for k in ("read", "accepted", "quarantined")}
    report = {**totals, "per_reason": dict(sum((c.reasons for c in ing.counts.values()), Counter())),
              "by_kind": {k: c.as_dict() for k, c in ing.counts.items()},
              "feedback": fb_counts, "replay": replay, "audit": audit_counts, **ing.reports(),
              "file_sha256": hashes, "data_hash": data_hash}
    assert report["read"] == report["accepted"] + report["quarantined"], "ingest lost records"
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log.info("ingest: read %d, accepted %d, quarantined %d (%s)", report["read"], report["accepted"],
             report["quarantined"], ", ".join(f"{k}: {v}" for k, v in report["per_reason"].items()) or "none")
    return report


def _audit(ing: Ingestor, examples: list[dict[str, Any]], writer: RecordWriter) -> dict[str, Any]:
    from tuneloop.data.feedback import audit_to_eval

    source = "audit-labels"
    before = (ing.counts["eval"].accepted, Counter(ing.counts["eval"].reasons))
    for i, rec in enumerate(audit_to_eval(examples), 1):
        ing.add("eval", RawRecord(source, i, rec), DataSource(path=source), writer)
    return {"examples": len(examples), "accepted": ing.counts["eval"].accepted - before[0],
            "per_reason": dict(ing.counts["eval"].reasons - before[1])}


def _replay(ing: Ingestor, cfg: DataConfig, champion: Any, writer: RecordWriter) -> dict[str, Any]:
    """Mix a share of the champion's SFT records into this run's (after all new SFT records)."""
    from tuneloop.data.replay import count_records, sample_records

    new = ing.counts["sft"].accepted
    rep: dict[str, Any] = {"share": cfg.replay_share, "champion_version": None, "pool": 0, "requested": 0,
                           "read": 0, "accepted": 0, "new_sft_accepted": new, "actual_share": 0.0}
    if cfg.replay_share <= 0:
        rep["note"] = "replay is off (data.replay_share = 0)"
        return rep
    if champion is None:
        rep["note"] = "no champion yet: nothing to replay"
        return rep
    pool = count_records(champion.sft)
    want = round(cfg.replay_share * new / (1 - cfg.replay_share))
    rep.update(champion_version=champion.version, pool=pool, requested=min(want, pool))
    source = f"replay:v{champion.version}"
    src = DataSource(path=source)
    before = (ing.counts["sft"].read, ing.counts["sft"].accepted, Counter(ing.counts["sft"].reasons))
    for i, rec in enumerate(sample_records(champion.sft, want), 1):
        ing.add("sft", RawRecord(source, i, rec), src, writer)
    rep["read"] = ing.counts["sft"].read - before[0]
    rep["accepted"] = ing.counts["sft"].accepted - before[1]
    # why replayed records were dropped (mostly: already in the new data): validate_data leaves them
    # out of the quarantine and duplicate shares, which judge the new data
    rep["per_reason"] = dict(ing.counts["sft"].reasons - before[2])
    rep["actual_share"] = round(rep["accepted"] / max(new + rep["accepted"], 1), 4)
    if want > pool:
        rep["note"] = f"the champion's data holds only {pool} records ({want} wanted)"
    log.info("replay: %d of %d requested records from champion v%s accepted (share %.3f)", rep["accepted"],
             rep["requested"], champion.version, rep["actual_share"])
    return rep
