"""PII scrubbing with Presidio, behind a cheap pre-filter that is never wrong in the unsafe direction.

The pre-filter (a necessary condition per recognizer, derived from Presidio's own patterns) lives
in data/pii_gate.py; a text that meets none of them skips Presidio.

The spaCy pipeline is skipped too when it cannot change a result: with the default blank English
pipeline (no components) every token's lemma is empty, so the context enhancer, the only reader
of the NLP output for these recognizers, never finds a context word and never changes a score.
Presidio then gets precomputed, empty NLP artifacts (`AnalyzerEngine.analyze(nlp_artifacts=...)`)
and its recognizers decide exactly as before; its URL recognizer (four 6,000-character regexes
tried at every position) reads only the whitespace-delimited tokens around the URL candidates,
which hold every match it can make (URL_SKELETONS). A test compares this path with Presidio's own,
result by result and score by score, over both corpora. With a trained pipeline (`nlp_model`),
lemmas exist, context can raise a score over the threshold, and every analysed text goes through
spaCy. With an NLP-based entity (PERSON) there is no cheap condition at all: every text goes to
Presidio.

tldextract (used by the email recognizer) is pinned to its bundled public-suffix snapshot:
nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import regex  # Presidio's regex engine: the same Unicode tables for \d, \w and \s

from tuneloop.config import PiiConfig
from tuneloop.data.pii_gate import offline_tldextract, build_gate, url_tld_regex

log = logging.getLogger("tuneloop.pii")

RECENT_TEXTS, RECENT_MAX_CHARS = 256, 4096  # PiiScrubber's memory of its last results (see __init__)


# the run of non-whitespace (as Presidio's regex engine defines it) that ends / starts at a position
_TOKEN_BACK = regex.compile(r"\S*", flags=regex.REVERSE)
_TOKEN_ON = regex.compile(r"\S*")


def _blank_spacy_dir() -> str:
    import spacy

    d = Path(tempfile.gettempdir()) / f"tuneloop-spacy-blank-en-{spacy.__version__}"
    if not (d / "config.cfg").exists():
        tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=d.name + "."))
        spacy.blank("en").to_disk(tmp)
        with contextlib.suppress(OSError):  # written concurrently by another process: theirs is as good
            os.replace(tmp, d)
    return str(d)


@functools.lru_cache(maxsize=4)
def _nlp_engine(model: str) -> Any:
    """Presidio's spaCy engine for a pipeline, loaded once per process (0.6 s even for the blank one: its
    tokenizer's special cases) and shared by every scrubber: it keeps no state between texts."""
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": model}])
    try:
        engine.load()
    except OSError as e:
        raise RuntimeError(f"data.pii.nlp_model: cannot load spaCy pipeline {model!r}: {e}") from None
    return engine


class PiiScrubber:
    """Finds PII with Presidio and replaces each span with <ENTITY_TYPE>; counts per entity type."""

    def __init__(self, cfg: PiiConfig) -> None:
        self.cfg = cfg
        self.gate = build_gate(cfg) if cfg.enabled else None
        self._analyzer: Any = None
        self._anonymizer: Any = None
        self.entities: Counter = Counter()  # replaced spans per entity type
        self.by_output: dict[str, Counter] = {}  # the same, per output (ingest: accepted / quarantined)
        self._pending: Counter = Counter()  # spans of the record in hand (see commit / discard)
        self.texts_seen = 0
        self.texts_analyzed = 0  # not cleared by the gate: Presidio's result (computed, or remembered)
        self.texts_changed = 0
        self.analyzed_for: Counter = Counter()  # texts Presidio looked at, per recognizer the gate left in
        self._skip_nlp = False  # set by _build: the spaCy pipeline cannot change a result (module doc)
        # the last texts Presidio scrubbed, with their result: ingest scrubs a quarantined record again
        # (its original is logged) right after scrubbing its fields, and Presidio's answer is the same
        self._recent: OrderedDict[str, tuple[str, tuple[str, ...]]] = OrderedDict()

    # -- Presidio, built on first use --
    def _build(self) -> None:
        offline_tldextract()
        import presidio_analyzer.predefined_recognizers as pr
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_anonymizer import AnonymizerEngine

        engine = _nlp_engine(self.cfg.nlp_model or _blank_spacy_dir())
        registry = RecognizerRegistry(supported_languages=["en"])
        ents = set(self.cfg.entities)
        for cls, ent in ((pr.EmailRecognizer, "EMAIL_ADDRESS"), (pr.UrlRecognizer, "URL"),
                         (pr.IpRecognizer, "IP_ADDRESS"), (pr.CreditCardRecognizer, "CREDIT_CARD"),
                         (pr.IbanRecognizer, "IBAN_CODE")):
            if ent in ents:
                registry.add_recognizer(cls())
        if "PHONE_NUMBER" in ents:
            registry.add_recognizer(pr.PhoneRecognizer(supported_regions=tuple(self.cfg.phone_regions)))
        if "PERSON" in ents:
            registry.add_recognizer(pr.SpacyRecognizer(supported_entities=["PERSON"]))
        self._analyzer = AnalyzerEngine(nlp_engine=engine, registry=registry, supported_languages=["en"])
        self._anonymizer = AnonymizerEngine()
        # no pipeline components (the blank pipeline): no lemmas, so context never raises a score
        self._skip_nlp = not engine.nlp["en"].pipe_names and "PERSON" not in ents

    @property
    def skips_nlp(self) -> bool:
        """Presidio runs without the spaCy pipeline (it cannot change a result; module doc). Known once
        Presidio is built (`load`)."""
        return self._skip_nlp

    def load(self) -> None:
        """Build Presidio now (seconds: spaCy pipeline, recognizers) instead of on the first text; a
        service calls it at start, off its event loop."""
        if self.cfg.enabled and self._analyzer is None:
            self._build()

    def candidates(self, text: str) -> frozenset[str] | list[str]:
        """The entity types Presidio could find in this text (the pre-filter); empty: none can."""
        return list(self.cfg.entities) if self.gate is None else self.gate(text)

    def needs_analysis(self, text: str) -> bool:
        """False only when no configured recognizer can match."""
        return bool(self.candidates(text))

    def analyze(self, text: str, entities: Any = None) -> list[Any]:
        """Presidio's findings above the score threshold (all configured entity types unless given).

        Where the spaCy pipeline cannot change a result (module doc), Presidio gets empty NLP
        artifacts instead, and its URL recognizer reads only the stretch of text from the first to
        the last whitespace-delimited token that holds a URL candidate (a host character, `.`, a
        TLD): a URL match lies inside one such token and depends on nothing outside it (see
        URL_SKELETONS), so it finds what it would find in the whole text, at a fraction of the cost
        of its four 6,000-character regexes over every position of a long text."""
        if self._analyzer is None:
            self._build()
        ents = sorted(entities or self.cfg.entities)
        if not self._skip_nlp:
            return self._analyzer.analyze(text, language="en", entities=ents,
                                          score_threshold=self.cfg.score_threshold)
        url_gate = url_tld_regex() if "URL" in ents else None
        if url_gate is None:
            return self._presidio(text, ents)
        ents.remove("URL")
        results = self._presidio(text, ents) if ents else []
        found = [m.span() for m in url_gate.finditer(text)]
        if found:
            start = _TOKEN_BACK.match(text, 0, found[0][0]).start()  # to the tokens' edges
            end = _TOKEN_ON.match(text, found[-1][1]).end()
            for r in self._presidio(text[start:end], ["URL"]):
                r.start, r.end = r.start + start, r.end + start
                results.append(r)
        from presidio_analyzer import EntityRecognizer

        return EntityRecognizer.remove_duplicates(results)  # what the engine ends with, over both calls

    def _presidio(self, text: str, entities: list[str]) -> list[Any]:
        """The analyzer on `text` with empty NLP artifacts: one token, no lemma, no keyword, so the
        context enhancer finds no context word, as it finds none in the blank pipeline's tokens."""
        from presidio_analyzer.nlp_engine import NlpArtifacts

        artifacts = NlpArtifacts(entities=[], tokens=[text], tokens_indices=[0], lemmas=[""], nlp_engine=None,
                                 language="en")
        return self._analyzer.analyze(text, language="en", entities=entities,
                                      score_threshold=self.cfg.score_threshold, nlp_artifacts=artifacts)

    def reference(self, text: str) -> list[Any]:
        """Presidio exactly as configured, no shortcut: every configured recognizer, the spaCy
        pipeline, no pre-filter. What the tests hold `analyze` and the pre-filter to."""
        if self._analyzer is None:
            self._build()
        return self._analyzer.analyze(text, language="en", entities=sorted(self.cfg.entities),
                                      score_threshold=self.cfg.score_threshold)

    def find(self, text: str) -> list[Any]:
        """Findings, with Presidio running only the recognizers the pre-filter left in."""
        if not self.cfg.enabled:
            return []
        ents = self.candidates(text)
        return self.analyze(text, ents) if ents else []

    def scrub(self, text: str) -> str:
        if not self.cfg.enabled:
            return text
        self.texts_seen += 1
        ents = self.candidates(text)
        if not ents:
            return text
        self.texts_analyzed += 1
        self.analyzed_for.update(ents)
        done = self._recent.get(text)
        if done is None:
            done = self._scrub(text, ents)
            if len(text) <= RECENT_MAX_CHARS:
                self._recent[text] = done
                if len(self._recent) > RECENT_TEXTS:
                    self._recent.popitem(last=False)  # the oldest
        out, found = done
        if not found:
            return text
        for ent in found:
            self.entities[ent] += 1
            self._pending[ent] += 1
        self.texts_changed += 1
        return out

    def _scrub(self, text: str, ents: Any) -> tuple[str, tuple[str, ...]]:
        """Presidio on one text: (the text with each span replaced, the replaced spans' entity types)."""
        results = self.analyze(text, ents)
        if not results:
            return text, ()
        from presidio_anonymizer.entities import OperatorConfig

        out = self._anonymizer.anonymize(text=text, analyzer_results=results,
                                         operators={"DEFAULT": OperatorConfig("replace")})
        return out.text, tuple(item.entity_type for item in out.items)

    def scrub_value(self, value: Any) -> Any:
        """Every string inside a JSON-like value (for quarantined records, which are logged too)."""
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self.scrub_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.scrub_value(v) for v in value]
        return value

    def commit(self, output: str) -> None:
        """The spans replaced since the last commit/discard went into `output`."""
        if not self._pending:
            return
        self.by_output.setdefault(output, Counter()).update(self._pending)
        self._pending.clear()

    def discard(self) -> None:
        """The spans replaced since the last commit/discard were not written (the record was rejected
        after parsing; its quarantine copy is scrubbed and counted again)."""
        if not self._pending:
            return
        self.entities.subtract(self._pending)
        self.entities = +self.entities
        self._pending.clear()

    def report(self) -> dict[str, Any]:
        return {"enabled": self.cfg.enabled, "entities": dict(sorted(self.entities.items())),
                "by_output": {k: dict(sorted(v.items())) for k, v in sorted(self.by_output.items()) if v},
                "texts_seen": self.texts_seen, "texts_analyzed": self.texts_analyzed,
                "texts_skipped_by_prefilter": self.texts_seen - self.texts_analyzed,
                "texts_changed": self.texts_changed,
                "texts_analyzed_for": dict(sorted(self.analyzed_for.items())),
                "nlp_model": self.cfg.nlp_model or "blank English pipeline (pattern recognizers only)"}
