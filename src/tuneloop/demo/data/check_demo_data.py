#!/usr/bin/env python3
"""Sanity checks for the tuneloop demo data set (standard library only).

Usage:  python3 src/tuneloop/demo/data/check_demo_data.py [DATA_DIR]

Exits with status 0 when every check passes, 1 otherwise.
"""
import collections
import difflib
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

LABELS = ("billing", "shipping", "account", "technical")
SLICES = ("ticket_routing", "general_qa")

SFT_KEYS = ["id", "prompt", "response", "slice"]
PREF_KEYS = ["id", "prompt", "chosen", "rejected", "slice"]
CANARY_KEYS = ["id", "prompt", "reference", "slice"]

# path -> (keys, id prefix, expected counts per slice, expected counts per label or None)
FILES = {
    "train/tickets.jsonl": (SFT_KEYS, "tr", {"ticket_routing": 160},
                            {l: 40 for l in LABELS}),
    "train/general.jsonl": (SFT_KEYS, "gq", {"general_qa": 80}, None),
    "eval/tickets.jsonl": (SFT_KEYS, "ev-tr", {"ticket_routing": 48},
                           {l: 12 for l in LABELS}),
    "eval/general.jsonl": (SFT_KEYS, "ev-gq", {"general_qa": 40}, None),
    "preferences.jsonl": (PREF_KEYS, "pp", {"ticket_routing": 40, "general_qa": 20},
                          {l: 10 for l in LABELS}),
    "canary_traffic.jsonl": (CANARY_KEYS, "ct", {"ticket_routing": 30, "general_qa": 10},
                             None),
}
# canary labels must be roughly balanced: each label between these bounds
CANARY_LABEL_RANGE = (6, 9)

TICKET_PROMPT_CHARS = (60, 300)
TICKET_SENTENCES = (1, 3)
GENERAL_PROMPT_CHARS = (10, 200)
GENERAL_ANSWER_WORDS = (1, 8)
REJECTED_MAX_CHARS = 400
NEAR_DUP_RATIO = 0.85  # difflib ratio between ticket prompts of different files

PII_PATTERNS = {
    "an e-mail address": re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"),
    "a phone-like number": re.compile(r"\+?\d[\d ()-]{8,}\d"),
    "a card-like number": re.compile(r"\b(?:\d[ -]?){13,19}\b"),
    "a URL": re.compile(r"https?://|www\.", re.I),
}

LICENCE = ("Written for the tuneloop project; released under the Apache-2.0 "
           "licence like the rest of the project.")

errors = []


def err(msg):
    errors.append(msg)


def norm(text):
    return " ".join(text.lower().split())


def sentence_count(text):
    n = len(re.findall(r"[.!?]+[\"')]*(?=\s|$)", text))
    if not re.search(r"[.!?][\"')]*\s*$", text):
        n += 1  # last sentence without final punctuation
    return n


def load(base, rel):
    path = os.path.join(base, rel)
    if not os.path.isfile(path):
        err(f"{rel}: missing")
        return []
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        err(f"{rel}: not valid UTF-8 ({e})")
        return []
    if text.startswith("\ufeff"):
        err(f"{rel}: has a byte-order mark")
    if "\r" in text:
        err(f"{rel}: contains CR characters (use LF line endings)")
    if not text.endswith("\n") or text.endswith("\n\n"):
        err(f"{rel}: must end with exactly one newline (no trailing blank lines)")
    rows = []
    for no, line in enumerate(text.split("\n")[:-1], 1):
        if not line.strip():
            err(f"{rel}:{no}: blank line")
            continue
        try:
            obj = json.loads(line, object_pairs_hook=list)
        except json.JSONDecodeError as e:
            err(f"{rel}:{no}: invalid JSON ({e})")
            continue
        if not isinstance(obj, list):
            err(f"{rel}:{no}: not a JSON object")
            continue
        keys = [k for k, _ in obj]
        rows.append((no, keys, dict(obj)))
    return rows


def check_text_field(rel, no, name, value):
    if not isinstance(value, str) or not value.strip():
        err(f"{rel}:{no}: '{name}' must be a non-empty string")
        return False
    if value != value.strip():
        err(f"{rel}:{no}: '{name}' has leading/trailing whitespace")
    if "\n" in value:
        err(f"{rel}:{no}: '{name}' contains a newline")
    return True


def check_answer(rel, no, name, value):
    words = len(value.split())
    lo, hi = GENERAL_ANSWER_WORDS
    if not lo <= words <= hi:
        err(f"{rel}:{no}: general_qa '{name}' has {words} words (want {lo}-{hi})")


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else HERE
    all_ids = {}
    prompt_files = collections.defaultdict(set)  # normalised prompt -> files
    ticket_prompts = []  # (file, prompt)
    summary = []

    for rel, (keys, prefix, slice_counts, label_counts) in FILES.items():
        rows = load(base, rel)
        slices = collections.Counter()
        labels = collections.Counter()
        seen_in_file = set()
        id_re = re.compile(rf"^{re.escape(prefix)}-(\d{{4}})$")
        for idx, (no, rkeys, r) in enumerate(rows, 1):
            if rkeys != keys:
                err(f"{rel}:{no}: keys {rkeys} != expected {keys}")
                if set(rkeys) != set(keys):
                    continue
            rid = r["id"]
            m = id_re.match(rid) if isinstance(rid, str) else None
            if not m:
                err(f"{rel}:{no}: bad id {rid!r} (want {prefix}-NNNN)")
            elif int(m.group(1)) != idx:
                err(f"{rel}:{no}: id {rid} out of sequence (expected {prefix}-{idx:04d})")
            if rid in all_ids:
                err(f"{rel}:{no}: duplicate id {rid!r} (also in {all_ids[rid]})")
            all_ids[rid] = rel

            s = r["slice"]
            if s not in SLICES:
                err(f"{rel}:{no}: unknown slice {s!r}")
                continue
            slices[s] += 1
            fields = [k for k in keys if k not in ("id", "slice")]
            if not all(check_text_field(rel, no, k, r[k]) for k in fields):
                continue

            prompt = r["prompt"]
            np_ = norm(prompt)
            if np_ in seen_in_file:
                err(f"{rel}:{no}: prompt duplicated within the file: {prompt!r}")
            seen_in_file.add(np_)
            prompt_files[np_].add(rel)

            if s == "ticket_routing":
                lo, hi = TICKET_PROMPT_CHARS
                if not lo <= len(prompt) <= hi:
                    err(f"{rel}:{no}: ticket prompt has {len(prompt)} chars (want {lo}-{hi})")
                n = sentence_count(prompt)
                if not TICKET_SENTENCES[0] <= n <= TICKET_SENTENCES[1]:
                    err(f"{rel}:{no}: ticket prompt has {n} sentences (want 1-3)")
                for what, pat in PII_PATTERNS.items():
                    if pat.search(prompt):
                        err(f"{rel}:{no}: ticket prompt contains {what}")
                ticket_prompts.append((rel, no, prompt))
                gold = r.get("response", r.get("chosen", r.get("reference")))
                if gold not in LABELS:
                    err(f"{rel}:{no}: label {gold!r} not one of {LABELS}")
                else:
                    labels[gold] += 1
                if "rejected" in r and r["rejected"] == r["chosen"]:
                    err(f"{rel}:{no}: rejected equals chosen")
            else:
                lo, hi = GENERAL_PROMPT_CHARS
                if not lo <= len(prompt) <= hi:
                    err(f"{rel}:{no}: general prompt has {len(prompt)} chars (want {lo}-{hi})")
                for k in ("response", "chosen", "reference"):
                    if k in r:
                        check_answer(rel, no, k, r[k])
                if "rejected" in r and norm(r["rejected"]) == norm(r["chosen"]):
                    err(f"{rel}:{no}: rejected equals chosen")
            if "rejected" in r and len(r["rejected"]) > REJECTED_MAX_CHARS:
                err(f"{rel}:{no}: rejected longer than {REJECTED_MAX_CHARS} chars")

        if dict(slices) != slice_counts:
            err(f"{rel}: slice counts {dict(slices)} != expected {slice_counts}")
        if label_counts is not None and dict(labels) != label_counts:
            err(f"{rel}: label counts {dict(labels)} != expected {label_counts}")
        if rel == "canary_traffic.jsonl":
            lo, hi = CANARY_LABEL_RANGE
            for l in LABELS:
                if not lo <= labels[l] <= hi:
                    err(f"{rel}: {labels[l]} '{l}' tickets (want {lo}-{hi})")
        summary.append(f"  {rel:24s} {len(rows):4d} rows  slices={dict(slices)}"
                       + (f"  labels={dict(labels)}" if labels else ""))

    # a prompt may only live in one file
    for p, files in prompt_files.items():
        if len(files) > 1:
            err(f"prompt appears in several files {sorted(files)}: {p!r}")

    # ticket prompts in different files must not be near-paraphrases
    near = 0
    for i in range(len(ticket_prompts)):
        fa, na, a = ticket_prompts[i]
        for j in range(i + 1, len(ticket_prompts)):
            fb, nb, b = ticket_prompts[j]
            if fa == fb:
                continue
            sm = difflib.SequenceMatcher(None, a.lower(), b.lower())
            if sm.quick_ratio() < NEAR_DUP_RATIO:
                continue
            r = sm.ratio()
            if r >= NEAR_DUP_RATIO:
                near += 1
                err(f"near-duplicate tickets ({r:.2f}): {fa}:{na} / {fb}:{nb}")

    readme = os.path.join(base, "README.md")
    if not os.path.isfile(readme):
        err("README.md: missing")
    else:
        with open(readme, encoding="utf-8") as f:
            if LICENCE not in " ".join(f.read().split()):
                err("README.md: licence statement missing")

    print("tuneloop demo data check")
    print("\n".join(summary))
    print(f"  ids: {len(all_ids)} unique, prompts: {len(prompt_files)} unique, "
          f"ticket prompts compared for near-duplicates: {len(ticket_prompts)}")
    if errors:
        print(f"FAILED: {len(errors)} problem(s)")
        for e in errors:
            print("  - " + e)
        return 1
    print("OK: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
