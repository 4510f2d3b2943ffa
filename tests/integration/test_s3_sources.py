"""s3:// sources through fsspec/s3fs against a real S3-compatible server: moto's server mode, started
as its own process on loopback (no in-process patching of boto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BUCKET = "tuneloop-data"


@pytest.fixture()
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch):
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_server)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    rows = [{"id": f"s{i}", "prompt": f"Ticket number {i}: my order {i} is late", "response": "shipping"}
            for i in range(999)]
    rows[10] = {"id": "pii", "prompt": "Mail jane@example.com about it", "response": "account"}
    body = "\n".join(json.dumps(r) for r in rows) + '\n{"truncated\n'
    client.put_object(Bucket=BUCKET, Key="train/a.jsonl", Body=body.encode())
    client.put_object(Bucket=BUCKET, Key="train/b.csv", Body=b"id,prompt,response\nc1,CSV from S3,billing\n"
                                                          b"c2,missing answer,\n")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["q1"], "prompt": ["Parquet from S3"], "response": ["technical"]}), buf)
    client.put_object(Bucket=BUCKET, Key="train/sub/c.parquet", Body=buf.getvalue().to_pybytes())
    client.put_object(Bucket=BUCKET, Key="train/notes.txt", Body=b"ignored: not a record file")
    client.put_object(Bucket=BUCKET, Key="eval/e.jsonl",
                      Body=json.dumps({"id": "e1", "prompt": "Ticket number 5: my order 5 is late",
                                       "response": "shipping"}).encode() + b"\n")
    return s3_server


def test_s3_folder_is_listed_and_streamed(s3: str, tmp_path: Path) -> None:
    from tuneloop.config import DataConfig, DataSource, DedupConfig
    from tuneloop.data.ingest import ingest
    from tuneloop.data.readers import expand

    opts = {"endpoint_url": s3}
    files = expand(f"s3://{BUCKET}/train/", storage_options=opts)
    assert files == [(f"s3://{BUCKET}/train/a.jsonl", "jsonl"), (f"s3://{BUCKET}/train/b.csv", "csv"),
                     (f"s3://{BUCKET}/train/sub/c.parquet", "parquet")]
    cfg = DataConfig(sources=[DataSource(path=f"s3://{BUCKET}/train/", storage_options=opts)],
                     eval=[DataSource(path=f"s3://{BUCKET}/eval/e.jsonl", storage_options=opts)],
                     dedup=DedupConfig(near_threshold=0))  # the rows differ only in a number
    rep = ingest(cfg, None, tmp_path / "out")
    assert rep["read"] == rep["accepted"] + rep["quarantined"]
    sft = rep["by_kind"]["sft"]
    assert sft["read"] == 999 + 1 + 2 + 1
    assert sft["per_source"] == {"a.jsonl": 998, "b.csv": 1, "c.parquet": 1}
    assert rep["per_reason"] == {"malformed JSON": 1, "field `response` is empty or whitespace": 1, "eval leak": 1}
    out = (tmp_path / "out" / "sft.jsonl").read_text()
    assert "jane@example.com" not in out and "Mail <EMAIL_ADDRESS> about it" in out
    q = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert {x["source"] for x in q} == {f"s3://{BUCKET}/train/a.jsonl", f"s3://{BUCKET}/train/b.csv"}


def test_s3_errors_are_one_line_source_errors(s3: str) -> None:
    from tuneloop.data.readers import SourceError, expand, read_records

    opts = {"endpoint_url": s3}
    with pytest.raises(SourceError, match=f"s3://{BUCKET}/nope/x.jsonl: no such file or folder"):
        expand(f"s3://{BUCKET}/nope/x.jsonl", storage_options=opts)
    with pytest.raises(SourceError, match="no such file or folder"):
        expand("s3://no-such-bucket-here/x.jsonl", storage_options=opts)
    with pytest.raises(SourceError, match="cannot tell the format"):
        list(read_records(f"s3://{BUCKET}/train/notes.txt", storage_options=opts))


def test_cli_ingest_reads_s3_with_the_endpoint_from_the_environment(s3: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from tuneloop.cli import app

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # botocore's standard variable; no S3 flag on the CLI
    res = CliRunner().invoke(app, ["ingest", f"s3://{BUCKET}/train/sub/", f"s3://{BUCKET}/train/b.csv",
                                   "--out", str(tmp_path / "o"), "--max-quarantine-share", "1"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (rep["read"], rep["accepted"], rep["quarantined"]) == (3, 2, 1)
    res = CliRunner().invoke(app, ["ingest", f"s3://{BUCKET}/missing.jsonl", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 1 and res.output.strip() == f"error: s3://{BUCKET}/missing.jsonl: no such file or folder"
