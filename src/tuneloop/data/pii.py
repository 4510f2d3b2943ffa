"""PII scrubbing with Presidio, behind a cheap pre-filter that is never wrong in the unsafe direction.

Presidio's analyzer costs ~1-2 ms per short record on one core (most of it in the phone
recognizer, which tries eight regions' number formats on every digit run), ten times the
data plane's budget. But every recognizer used here is a pattern matcher, and each pattern
has a necessary condition that a single compiled regex checks in microseconds:

    EMAIL_ADDRESS  every pattern contains a literal `@`
    URL            every pattern contains `[a-z0-9.-]` `.` <TLD>, and every TLD starts with a letter
    IP_ADDRESS     IPv4 forms contain d.d.d.d (ASCII digits); every IPv6 form contains `::`
                   or 7 `h:` groups
    CREDIT_CARD    4 + 3 + 3 + 3 or more digits with at most one `-`/space between groups
    IBAN_CODE      two letters directly followed by two ASCII digits (checked case-insensitively,
                   Presidio's own pattern is case-sensitive)
    PHONE_NUMBER   python-phonenumbers' matcher only accepts digit runs joined by its own
                   punctuation class (at most 4 characters between digits); a valid number has
                   at least K digits, K = the shortest valid national number of the configured
                   regions, or 1 + the shortest national number of any region for a +CC number

A text that meets none of them cannot produce a Presidio result for these entities, so it
skips Presidio; `PiiScrubber.needs_analysis` is that test. The conditions were derived from
the recognizers' patterns: `RECOGNIZER_FINGERPRINT` pins them, and a test fails when a
Presidio upgrade changes a pattern (re-derive the gate, then update the fingerprint). Another
test runs Presidio and the gate over a varied corpus and asserts the gate never skips a text
Presidio flags. With an NLP-based entity (PERSON, with a trained spaCy model) there is no
such condition: every text goes to Presidio.

tldextract (used by the email recognizer) is pinned to its bundled public-suffix snapshot:
nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from collections.abc import Callable
from typing import Any

from tuneloop.config import PiiConfig

log = logging.getLogger("tuneloop.pii")

PATTERN_ENTITIES = {"EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL"}
# sha256 over the regexes of the pattern recognizers the gate was derived from (see module doc)
RECOGNIZER_FINGERPRINT = "69669fe3df3ccc71ff66301983c3cc0069b0f22af8e43750327b25186168685a"


def _offline_tldextract() -> None:
    """Make tldextract use the public suffix list bundled with it, never the network."""
    os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
    import tldextract
    import tldextract.tldextract as tt

    if getattr(tt.TLD_EXTRACTOR, "suffix_list_urls", None) != ():
        tt.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)


def recognizer_patterns() -> dict[str, list[str]]:
    """The regexes of Presidio's pattern recognizers for the entities the gate knows (for the fingerprint)."""
    import presidio_analyzer.predefined_recognizers as pr

    out = {}
    for cls in (pr.EmailRecognizer, pr.UrlRecognizer, pr.IpRecognizer, pr.CreditCardRecognizer,
                pr.IbanRecognizer):
        r = cls()
        out[r.supported_entities[0]] = [p.regex for p in r.patterns] + [f"flags={int(r.global_regex_flags)}"]
    return out


def patterns_fingerprint() -> str:
    pats = recognizer_patterns()
    return hashlib.sha256("\n".join(f"{k}:{v}" for k, vs in sorted(pats.items()) for v in vs).encode()).hexdigest()


def min_phone_digits(regions: list[str]) -> int:
    """The fewest digits a number Presidio's phone recognizer accepts can have (see module doc)."""
    import phonenumbers
    from phonenumbers import PhoneMetadata

    kinds = ("general_desc", "fixed_line", "mobile", "toll_free", "premium_rate", "shared_cost",
             "personal_number", "voip", "pager", "uan", "voicemail")

    def shortest(md: Any) -> int:
        lens = [n for k in kinds if getattr(md, k, None) is not None
                for n in (getattr(md, k).possible_length or ()) if n > 0]
        return min(lens) if lens else 1

    everywhere = [shortest(PhoneMetadata.metadata_for_region(r)) for r in phonenumbers.SUPPORTED_REGIONS]
    everywhere += [shortest(PhoneMetadata.metadata_for_nongeo_region(cc))
                   for cc in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS]
    national = [shortest(PhoneMetadata.metadata_for_region(r)) for r in regions
                if PhoneMetadata.metadata_for_region(r) is not None]
    return max(1, min([*national, 1 + min(everywhere)]))


def build_gate(cfg: PiiConfig) -> Callable[[str], frozenset[str]] | None:
    """A function that returns the entity types whose necessary condition a text meets (see the
    module doc): empty means no configured recognizer can match it. None = no gate (NLP entities).

    The conditions are checked cheapest first (substring tests, then one regex each, the
    digit-based ones only from the first digit on): ~2-5 microseconds for a 200-character text.
    Presidio then runs only the recognizers of the returned types: the others cannot match, so
    the result is the same as running all of them, at half the cost or less."""
    import regex  # Presidio's regex engine: the same Unicode tables for \\d and \\w
    from phonenumbers.phonenumberutil import _VALID_PUNCTUATION

    if not set(cfg.entities) <= PATTERN_ENTITIES:
        return None  # an NLP entity (PERSON) has no necessary condition: analyse everything
    ents = set(cfg.entities)
    email, ipv6 = "EMAIL_ADDRESS" in ents, "IP_ADDRESS" in ents
    none: frozenset[str] = frozenset()
    url = regex.compile(r"[\w.\-]\.[^\W\d_]") if "URL" in ents else None
    ipv6_full = regex.compile(r"(?:[0-9A-Fa-f]{1,4}:){7}")
    digit = regex.compile(r"\d")
    digit_gates = []
    if "IP_ADDRESS" in ents:
        digit_gates.append(("IP_ADDRESS", regex.compile(r"[0-9]\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]")))
    if "CREDIT_CARD" in ents:
        digit_gates.append(("CREDIT_CARD", regex.compile(r"\d{4}[\- ]?\d{3,4}[\- ]?\d{3,4}[\- ]?\d{3,5}")))
    if "IBAN_CODE" in ents:
        digit_gates.append(("IBAN_CODE", regex.compile(r"[0-9]{2}(?<=[^\W\d_]{2}[0-9]{2})")))
    if "PHONE_NUMBER" in ents:
        k = min_phone_digits(cfg.phone_regions)
        digit_gates.append(("PHONE_NUMBER",
                            regex.compile(r"\d(?:[" + _VALID_PUNCTUATION + r"]{0,4}\d){%d}" % (k - 1))))

    def gate(text: str) -> frozenset[str]:
        fired = []
        if email and "@" in text:
            fired.append("EMAIL_ADDRESS")
        if ipv6 and ":" in text and ("::" in text or ipv6_full.search(text)):
            fired.append("IP_ADDRESS")
        if url is not None and "." in text and url.search(text):
            fired.append("URL")
        if digit_gates:
            m = digit.search(text)
            if m is not None:
                start = max(0, m.start() - 2)  # the IBAN gate looks two letters back
                fired += [ent for ent, g in digit_gates if g.search(text, start)]
        return frozenset(fired) if fired else none

    return gate


def _blank_spacy_dir() -> str:
    import spacy

    d = Path(tempfile.gettempdir()) / f"tuneloop-spacy-blank-en-{spacy.__version__}"
    if not (d / "config.cfg").exists():
        tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=d.name + "."))
        spacy.blank("en").to_disk(tmp)
        with contextlib.suppress(OSError):  # written concurrently by another process: theirs is as good
            os.replace(tmp, d)
    return str(d)


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
        self.texts_analyzed = 0  # went through Presidio (the rest were cleared by the gate)
        self.texts_changed = 0

    # -- Presidio, built on first use --
    def _build(self) -> None:
        _offline_tldextract()
        import presidio_analyzer.predefined_recognizers as pr
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
        from presidio_anonymizer import AnonymizerEngine

        model = self.cfg.nlp_model or _blank_spacy_dir()
        engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": model}])
        try:
            engine.load()
        except OSError as e:
            raise RuntimeError(f"data.pii.nlp_model: cannot load spaCy pipeline {model!r}: {e}") from None
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
        """Presidio's findings above the score threshold (all configured entity types unless given)."""
        if self._analyzer is None:
            self._build()
        return self._analyzer.analyze(text, language="en", entities=sorted(entities or self.cfg.entities),
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
        results = self.analyze(text, ents)
        if not results:
            return text
        from presidio_anonymizer.entities import OperatorConfig

        out = self._anonymizer.anonymize(text=text, analyzer_results=results,
                                         operators={"DEFAULT": OperatorConfig("replace")})
        for item in out.items:
            self.entities[item.entity_type] += 1
            self._pending[item.entity_type] += 1
        self.texts_changed += 1
        return out.text

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
                "nlp_model": self.cfg.nlp_model or "blank English pipeline (pattern recognizers only)"}
