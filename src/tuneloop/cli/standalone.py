"""Commands that work on files without a run config: evaluate, ingest."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from tuneloop.cli.shared import app, console, fail, fail_line


@app.command()
def evaluate(
    candidate: Annotated[Path, typer.Option(help="Candidate: a LoRA adapter folder or a save_pretrained model folder.")],
    data: Annotated[list[str], typer.Option(help="Held-out eval file or folder (JSONL/CSV/Parquet: prompt, response, "
                                                 "slice; preference pairs with chosen/rejected). Repeatable.")],
    gates: Annotated[Path, typer.Option(help="YAML with the `evaluate` section of a run config: slices, gates, "
                                             "optional safety.")],
    out: Annotated[Path, typer.Option(help="Output folder: gate.json, report.md, metrics.json, predictions.jsonl.")],
    champion: Annotated[Path | None, typer.Option(help="Champion (adapter or model folder); default: the base "
                                                       "model stands in for it.")] = None,
    base: Annotated[Path | None, typer.Option(help="Base model folder for adapters; default: the candidate "
                                                   "adapter's base_model_name_or_path.")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System message for every prompt (as in the run "
                                                           "config's data.system_prompt).")] = None,
) -> None:
    """Score candidate and champion on the same held-out data per slice and apply the gate.

    Exits 0 whether the gate passes or fails (the decision is in OUT/gate.json), non-zero on error.
    """
    from tuneloop.config import ConfigError
    from tuneloop.data.readers import SourceError
    from tuneloop.evaluate.run import evaluate_paths

    logging.basicConfig(level=logging.WARNING)
    try:
        result = evaluate_paths(candidate, champion, data, gates, out, base, system_prompt)
    except (ConfigError, SourceError, FileNotFoundError, ValueError) as e:
        fail(str(e), 2)
    g = result["gate"]
    console.print(f"gate {'PASSED' if g['passed'] else 'FAILED'} (reference: {g['reference']}); "
                  f"{sum(r['passed'] for r in g['rules'])}/{len(g['rules'])} rules pass")
    for r in g["rules"]:
        if not r["passed"]:
            console.print(f"  FAIL {r['slice']}/{r['metric']}: {r['why']}")
    console.print(f"wrote {out / 'gate.json'} and {out / 'report.md'}")


@app.command()
def ingest(
    paths: Annotated[list[str], typer.Argument(metavar="PATHS...", help="Files or folders of .jsonl/.csv/.parquet "
                                                                        "records (folders are read recursively), "
                                                                        "local or s3://bucket/prefix/.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: accepted.jsonl, quarantine.jsonl, report.json "
                                                    "(and eval.jsonl with --eval); written next to it and swapped in "
                                                    "when complete, so an error leaves an earlier output as it was. "
                                                    "A new folder or an earlier output folder.")],
    eval_: Annotated[list[str] | None, typer.Option(
        "--eval", help="Held-out eval set (repeatable): training records that repeat or nearly repeat one of its "
                       "prompts are quarantined as eval leaks.")] = None,
    kind: Annotated[str, typer.Option(help="auto: records with chosen/rejected are preference pairs, the rest SFT "
                                           "(messages or prompt/response); or sft, preference, classification.")]
    = "auto",
    template: Annotated[str | None, typer.Option(
        help="Classification records: the instruction with record fields in braces, e.g. "
             "'Route this ticket: {text}' (implies --kind classification).")] = None,
    label_field: Annotated[str, typer.Option(help="Classification records: the field with the answer.")] = "label",
    slice_: Annotated[str | None, typer.Option("--slice", help="Slice label for records that carry none "
                                                                "(default: `default`).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto (from the file extension), jsonl, csv or parquet.")]
    = "auto",
    tokenizer: Annotated[Path | None, typer.Option(
        help="A save_pretrained folder with a chat template: accepted records also get prompt/completion (or "
             "chosen/rejected) rendered with it. Without it records are checked, scrubbed and deduplicated but "
             "not chat-formatted.")] = None,
    pii: Annotated[bool, typer.Option("--pii/--no-pii", help="Scrub PII (Presidio pattern recognizers: email, "
                                                             "phone, credit card, IBAN, IP, URL).")] = True,
    near_dup: Annotated[float, typer.Option(help="Jaccard threshold for near-duplicate removal (MinHash LSH); "
                                                 "0 turns it off.")] = 0.85,
    max_prompt_chars: Annotated[int, typer.Option(help="Longer prompts are quarantined.")] = 4000,
    max_response_chars: Annotated[int, typer.Option(help="Longer responses are quarantined.")] = 4000,
    encoding: Annotated[str, typer.Option(
        help="Text encoding of the JSONL/CSV inputs: a Python codec name (utf-8, cp1252, latin-1, utf-16, ...) or "
             "auto (detected per file from its first 64 KiB). A byte-order mark is honoured. With utf-8 a CSV "
             "that is not UTF-8 is refused, naming the line and the encoding it looks like; with any other value "
             "rows that cannot be decoded are quarantined.")] = "utf-8",
    max_length: Annotated[int | None, typer.Option(
        help="Needs --tokenizer: training records longer than this many tokens (chat-formatted prompt + answer, "
             "as train.sft.max_length / train.dpo.max_length count them) are handled by --long-records.")] = None,
    long_records: Annotated[str | None, typer.Option(
        help="With --max-length: quarantine (default) or truncate_prompt (cut the prompt from the left, keep the "
             "whole answer; a record whose answer alone does not fit is quarantined).")] = None,
    max_quarantine_share: Annotated[float | None, typer.Option(
        help="Exit 1 when more than this share (0-1) of the records read was quarantined (a binary or JSON-array "
             "file, a wrong --encoding); the outputs are still written. Default: the default of the run "
             "config's data.max_quarantine_share, 0.1.")] = None,
) -> None:
    """Check, scrub and deduplicate record files on their own (no config, no MLflow).

    Exit 0 when the data was processed, even with quarantined records up to --max-quarantine-share; 1 with a
    one-line error when an input cannot be read at all (missing file, unknown or broken format, not in
    --encoding; OUT is left as it was) or when more records were quarantined (OUT holds them, with reasons).
    """
    from tuneloop.data.ingest_files import OutputFolderError, ingest_paths
    from tuneloop.data.readers import SourceError

    if kind not in ("auto", "sft", "preference", "classification"):
        fail_line(f"--kind {kind!r}: use auto, sft, preference or classification", 2)
    if fmt not in ("auto", "jsonl", "csv", "parquet"):
        fail_line(f"--format {fmt!r}: use auto, jsonl, csv or parquet", 2)
    if kind == "classification" and template is None:
        fail_line("--kind classification needs --template, e.g. 'Route this ticket: {text}'", 2)
    if not 0 <= near_dup <= 1:
        fail_line(f"--near-dup {near_dup}: a Jaccard threshold between 0 and 1", 2)
    from tuneloop.config.data import encoding_problem

    if encoding_problem(encoding):
        fail_line(f"--encoding {encoding}: {encoding_problem(encoding)}", 2)
    if long_records not in (None, "quarantine", "truncate_prompt"):
        fail_line(f"--long-records {long_records!r}: use quarantine or truncate_prompt", 2)
    if max_length is not None and tokenizer is None:
        fail_line("--max-length needs --tokenizer: tokens are counted with the model's tokenizer", 2)
    if long_records is not None and max_length is None:
        fail_line("--long-records needs --max-length (and --tokenizer)", 2)
    if max_length is not None and max_length <= 8:
        fail_line(f"--max-length {max_length}: more than 8 tokens", 2)
    if max_quarantine_share is None:
        from tuneloop.config import DataConfig

        max_quarantine_share = DataConfig.model_fields["max_quarantine_share"].default
    if not 0 <= max_quarantine_share <= 1:
        fail_line(f"--max-quarantine-share {max_quarantine_share}: a share between 0 and 1", 2)
    formatter = None
    if tokenizer is not None:
        formatter = _formatter(tokenizer)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        if template is not None:
            from tuneloop.config import template_fields

            template_fields(template)
        report = ingest_paths(paths, out, eval_paths=eval_ or [], kind=kind, template=template,
                              label_field=label_field, slice_=slice_, fmt=fmt, formatter=formatter, pii=pii,
                              near_threshold=near_dup, max_prompt_chars=max_prompt_chars,
                              max_response_chars=max_response_chars, encoding=encoding, max_length=max_length,
                              long_records=long_records or "quarantine")
    except SourceError as e:
        fail_line(str(e).splitlines()[0])
    except OutputFolderError as e:
        fail_line(f"--out {e}", 2)
    except ValueError as e:  # a template that is not usable
        fail_line(str(e).splitlines()[0], 2)
    except OSError as e:
        fail_line(f"{e.filename or out}: {e.strerror or e}")
    except Exception as e:  # noqa: BLE001 - one line, never a traceback; OUT is left as it was
        logging.getLogger("tuneloop.ingest").debug("ingest failed", exc_info=True)
        fail_line(f"ingest failed ({type(e).__name__}): {' '.join(str(e).split())}; {out} is left as it was")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(report["per_reason"].items(), key=lambda kv: -kv[1]))
    cut = report["long_records"]["truncated"]
    typer.echo(f"read {report['read']}, accepted {report['accepted']}, quarantined {report['quarantined']}"
               + (f" ({reasons})" if reasons else "") + (f"; {cut} prompts cut to --max-length" if cut else "")
               + f" -> {out}")
    share = report["quarantined"] / report["read"] if report["read"] else 0.0
    if share > max_quarantine_share:
        fail_line(f"{report['quarantined']} of the {report['read']} records read ({share:.0%}) were quarantined, "
                  f"more than --max-quarantine-share {max_quarantine_share:g}; {_first_quarantined(out)}"
                  f"all reasons in {out / 'quarantine.jsonl'}")


def _first_quarantined(out: Path) -> str:
    """`e.g. FILE row N: REASON; ` for the first quarantined record ('' if there is none to show)."""
    import json

    try:
        with (out / "quarantine.jsonl").open(encoding="utf-8") as f:
            q = json.loads(f.readline())
        return f"e.g. {Path(str(q['source'])).name} row {q['row']}: {' '.join(str(q['reason']).split())}; "
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _formatter(tokenizer_dir: Path):
    from tuneloop.data.formatting import ChatFormatter

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except ImportError:
        fail_line("--tokenizer needs transformers (pip install tuneloop[train])", 2)
    except (OSError, ValueError) as e:
        fail_line(f"--tokenizer {tokenizer_dir}: cannot load a tokenizer: {str(e).splitlines()[0]}", 2)
    if not getattr(tok, "chat_template", None) or tok.eos_token is None:
        fail_line(f"--tokenizer {tokenizer_dir}: has no chat template or no eos token", 2)
    return ChatFormatter(tok)


