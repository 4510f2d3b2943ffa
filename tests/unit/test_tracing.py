"""Tracing (tuneloop/tracing.py): on through the standard OTEL_* variables, a server span per gateway request
whose trace id is in the logged row, feedback linked to the request it rates, a span per pipeline stage
carrying its MLflow run (one trace per pipeline run), export over OTLP/HTTP - and, off, no OpenTelemetry
import at all. Timings are measured by bench/gateway_load.py, never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import tiny_config

from tuneloop import tracing

pytestmark = pytest.mark.unit
CHAT = "/v1/chat/completions"
# what tracing loads when on: the SDK, the exporter (and what it used to load: the FastAPI instrumentation). FastAPI
# itself imports the OpenTelemetry API for its own native telemetry, which stays idle without a configured provider
NOT_WHEN_OFF = ("opentelemetry.sdk", "opentelemetry.instrumentation", "opentelemetry.exporter")


class Stub:
    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
        return "ok", 3, 1


@pytest.fixture
def spans() -> Any:
    """Tracing on in this process, every span kept in memory; off again afterwards."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.configure(exporter, "tuneloop-test")
    yield exporter
    tracing.reset()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", **extra}


@pytest.mark.parametrize("env, on", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
])
def test_on_only_when_the_standard_variables_ask_for_traces(env, on):
    assert tracing.enabled(env) is on


def test_a_gateway_request_is_a_server_span_whose_trace_id_is_in_the_logged_row(tmp_path, tiny_model_dir, spans):
    from fastapi.testclient import TestClient
    from opentelemetry.trace import SpanKind

    from tuneloop.config import load_config
    from tuneloop.deploy.gateway import Gateway, create_app
    from tuneloop.feedback.auth import local_token

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data__pii__enabled=False))
    gw = Gateway(cfg, backend_factory=lambda v: Stub())
    gw.reload()
    with TestClient(create_app(gw), headers={"Authorization": f"Bearer {local_token(cfg.state_path)}"}) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": "where is my parcel?"}], "user": "u1"})
        assert r.status_code == 200, r.text
        rid = r.json()["id"]
        assert c.post("/v1/feedback", json={"request_id": rid, "thumbs": "up"}).status_code == 200

    finished = spans.get_finished_spans()
    server = [s for s in finished if s.kind == SpanKind.SERVER]
    # one span per request (FastAPI's own spans off), none for the probe and the scrape
    assert sorted(s.attributes.get("http.route") for s in server) == [CHAT, "/v1/feedback"]
    assert len(finished) == 2 and {s.instrumentation_scope.name for s in finished} == {"tuneloop.tracing"}
    (chat,) = [s for s in server if s.attributes["http.route"] == CHAT]
    trace_id = format(chat.context.trace_id, "032x")
    assert chat.attributes["tuneloop.variant"] == "champion" and chat.attributes["tuneloop.model_version"] == "base"
    assert chat.resource.attributes["service.name"] == "tuneloop-test"

    (row,) = gw.store.requests()
    assert row["request_id"] == rid == trace_id + format(chat.context.span_id, "016x")
    assert tracing.trace_id_of(row["request_id"]) == trace_id
    # the feedback's span names the request it rates and links to that request's span
    (fb,) = [s for s in server if s.attributes["http.route"] == "/v1/feedback"]
    assert fb.attributes["tuneloop.request_id"] == rid
    assert [(link.context.trace_id, link.context.span_id) for link in fb.links] == [
        (chat.context.trace_id, chat.context.span_id)]
    gw.store.close()


def test_a_failed_request_is_an_error_span(tmp_path, tiny_model_dir, spans):
    from fastapi.testclient import TestClient
    from opentelemetry.trace import SpanKind, StatusCode

    from tuneloop.config import load_config
    from tuneloop.deploy.gateway import Gateway, create_app
    from tuneloop.feedback.auth import local_token

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data__pii__enabled=False))
    gw = Gateway(cfg, backend_factory=lambda v: Stub())
    gw.reload()
    gw.faults["champion"] = {"error_rate": 1.0, "added_latency_ms": 0.0}
    with TestClient(create_app(gw), headers={"Authorization": f"Bearer {local_token(cfg.state_path)}"}) as c:
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500
    (server,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.status.status_code == StatusCode.ERROR
    (row,) = gw.store.requests()
    assert row["status"] == "error"
    assert tracing.trace_id_of(row["request_id"]) == format(server.context.trace_id, "032x")
    gw.store.close()


def _items_app() -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.get("/items/{item}")
    def item(item: int) -> dict[str, Any]:
        return {"item": item, "request_id": tracing.request_id()}

    @app.get("/unavailable")
    def unavailable() -> JSONResponse:
        return JSONResponse({"detail": "later"}, status_code=503)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> dict[str, str]:
        return {}

    return app


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_server_spans_follow_the_http_conventions_and_the_callers_trace_context(spans):
    from fastapi.testclient import TestClient
    from opentelemetry.trace import SpanKind, StatusCode

    app = _items_app()
    assert tracing.instrument_app(app, "tuneloop-test")
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200  # no spans
        own = c.get("/items/7").json()["request_id"]
        called = c.get("/items/8", headers={"traceparent": TRACEPARENT}).json()["request_id"]
        assert c.get("/unavailable").status_code == 503
        assert c.get("/boom").status_code == 500
        assert c.get("/nowhere").status_code == 404

    finished = spans.get_finished_spans()
    assert all(s.kind == SpanKind.SERVER and s.instrumentation_scope.name == "tuneloop.tracing" for s in finished)
    first, second, unavailable, boom, nowhere = finished  # one span per traced request, nothing else
    assert first.name == "GET /items/{item}" and dict(first.attributes) == {
        "http.request.method": "GET", "url.scheme": "http", "url.path": "/items/7", "http.route": "/items/{item}",
        "http.response.status_code": 200}
    assert first.parent is None and first.status.status_code == StatusCode.UNSET
    assert own == format(first.context.trace_id, "032x") + format(first.context.span_id, "016x")
    # the caller's W3C trace context is the parent: same trace, its span id, remote
    assert format(second.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c" == called[:32]
    assert format(second.parent.span_id, "016x") == "b7ad6b7169203331" and second.parent.is_remote
    # 5xx: an error (the status code is the error type); an exception: recorded, its type the error type
    assert unavailable.status.status_code == StatusCode.ERROR
    assert unavailable.attributes["http.response.status_code"] == 503 and unavailable.attributes["error.type"] == "503"
    assert boom.status.status_code == StatusCode.ERROR and boom.attributes["error.type"] == "RuntimeError"
    assert [e.name for e in boom.events] == ["exception"] and boom.attributes["http.route"] == "/boom"
    # 4xx is the client's: no error; no route matched: no http.route, named by the method alone
    assert nowhere.name == "GET" and "http.route" not in nowhere.attributes
    assert nowhere.attributes["http.response.status_code"] == 404 and nowhere.status.status_code == StatusCode.UNSET


def test_excluded_urls_follow_the_standard_variable(spans, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", "^/items/1$,unavail")
    app = _items_app()
    assert tracing.instrument_app(app, "tuneloop-test")
    with TestClient(app) as c:
        for path in ("/items/1", "/items/12", "/unavailable", "/healthz"):
            c.get(path)
    assert [s.attributes["url.path"] for s in spans.get_finished_spans()] == ["/items/12", "/healthz"]


def test_stage_spans_carry_their_mlflow_run_and_share_the_pipeline_runs_trace(spans):
    from opentelemetry.trace import StatusCode

    parent = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"  # an MLflow run id: a uuid4 hex
    with tracing.stage_span("ingest", "aaaa1111bbbb2222cccc3333dddd4444", parent) as span:
        assert span is not None and span.is_recording()
    with pytest.raises(RuntimeError, match="boom"):
        with tracing.stage_span("sft", "eeee5555ffff6666aaaa7777bbbb8888", parent):
            raise RuntimeError("boom")
    with tracing.stage_span("report", None):  # no MLflow run: a trace of its own
        pass
    ingest, sft, report = spans.get_finished_spans()
    assert ingest.name == "stage ingest" and sft.name == "stage sft"
    assert ingest.attributes["mlflow.run_id"] == "aaaa1111bbbb2222cccc3333dddd4444"
    assert ingest.attributes["mlflow.parent_run_id"] == parent and ingest.attributes["tuneloop.stage"] == "ingest"
    assert format(ingest.context.trace_id, "032x") == format(sft.context.trace_id, "032x") == parent
    assert ingest.parent is not None and ingest.parent.span_id == sft.parent.span_id  # the run's (unexported) root
    assert sft.status.status_code == StatusCode.ERROR and sft.events[0].name == "exception"
    assert format(report.context.trace_id, "032x") != parent and "mlflow.run_id" not in report.attributes


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps each POST's path and body."""

    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_the_standard_variables_send_spans_over_otlp_http():
    """A process configured only by OTEL_* (as the chart sets them) exports a stage's span to the collector."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = ("from tuneloop.tracing import stage_span\n"
                "with stage_span('evaluate', 'aaaa1111bbbb2222cccc3333dddd4444', '0f1e2d3c4b5a69788796a5b4c3d2e1f0'):\n"
                "    pass\n")
        env = _clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
                         OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        server.shutdown()
    (path, body), = _Collector.received
    assert path == "/v1/traces"
    req = ExportTraceServiceRequest.FromString(body)
    (rs,) = req.resource_spans
    resource = {a.key: a.value.string_value for a in rs.resource.attributes}
    assert resource["service.name"] == "tuneloop-pipeline" and resource["deployment.environment"] == "test"
    (span,) = [s for ss in rs.scope_spans for s in ss.spans]
    assert span.name == "stage evaluate" and span.trace_id.hex() == "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    assert {a.key: a.value.string_value for a in span.attributes}["mlflow.run_id"] == "aaaa1111bbbb2222cccc3333dddd4444"


def test_a_servers_spans_are_exported_by_a_child_process():
    """A server process configured only by OTEL_* hands its spans to an export process (the SDK's batch processor and
    OTLP exporter run there, not in the server): they reach the collector whole - parent, links, events, resource -
    at a flush and at shutdown, after which the export process has exited."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[tuple[str, bytes]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = f"""
import json, os, sys
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tuneloop import tracing
app = FastAPI()
@app.get("/items/{{item}}")
def item(item: int):
    tracing.annotate({{"tuneloop.item": item}}, link_request="ab" * 24)
    if item == 0:
        raise RuntimeError("zero")
    return {{"request_id": tracing.request_id()}}
assert tracing.instrument_app(app, "tuneloop-x")
(child,) = tracing._provider._active_span_processor._span_processors
assert isinstance(child, tracing.ExportProcess) and child.pid != os.getpid()
with TestClient(app, raise_server_exceptions=False) as c:
    rid = c.get("/items/1", headers={{"traceparent": {TRACEPARENT!r}}}).json()["request_id"]
    assert c.get("/items/0").status_code == 500
    assert tracing._provider.force_flush(20000)
    here = [m for m in sys.modules if m.startswith("opentelemetry.exporter")]
    print(json.dumps({{"rid": rid, "exporter_here": here}}), flush=True)
    sys.stdin.readline()  # the test has seen the flushed spans
    c.get("/items/2")
tracing.reset()  # shutdown: the export process exports what it holds and exits
print(json.dumps({{"exit": child._child.returncode}}), flush=True)
"""
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env=_clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{server.server_port}"))
        first = json.loads(proc.stdout.readline() or "null")
        flushed = list(received)
        out, err = proc.communicate("go\n", timeout=120)
        assert first is not None and proc.returncode == 0, err[-3000:]
    finally:
        server.shutdown()
    assert first["exporter_here"] == []  # no OTLP exporter in the server process
    assert json.loads(out.strip().splitlines()[-1]) == {"exit": 0}

    def spans_of(posts: list[tuple[str, bytes]]) -> list[Any]:
        assert all(path == "/v1/traces" for path, _ in posts)
        out = []
        for _, body in posts:
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                assert resource["service.name"] == "tuneloop-x"
                out += [s for ss in rs.scope_spans for s in ss.spans if ss.scope.name == "tuneloop.tracing"]
        return out

    one, zero = spans_of(flushed)  # both there at the flush
    assert one.name == "GET /items/{item}" and one.kind == one.SPAN_KIND_SERVER
    assert one.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c" == first["rid"][:32]
    assert one.parent_span_id.hex() == "b7ad6b7169203331" and one.span_id.hex() == first["rid"][32:]
    attributes = {a.key: a.value.string_value or a.value.int_value for a in one.attributes}
    assert attributes["tuneloop.item"] == 1 and attributes["http.response.status_code"] == 200
    assert [(link.trace_id.hex(), link.span_id.hex()) for link in one.links] == [("ab" * 16, "ab" * 8)]
    assert zero.status.code == zero.status.STATUS_CODE_ERROR and [e.name for e in zero.events] == ["exception"]
    (two,) = spans_of(received[len(flushed):])  # exported at shutdown
    assert {a.key: a.value.string_value for a in two.attributes}["url.path"] == "/items/2"


def test_an_export_process_behind_or_gone_never_blocks_the_server(caplog, monkeypatch):
    """Spans the export process cannot take (its socket buffer full: stopped, starved) are dropped and counted in
    the log, not waited for; once it is gone, ending a span costs nothing and the loss is logged once."""
    import logging
    import signal
    import time

    from opentelemetry.sdk.trace import TracerProvider

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # the child's; nothing gets sent
    provider = TracerProvider()
    child = tracing.ExportProcess.start(provider.resource, ["otlp"])
    assert child is not None
    provider.add_span_processor(child)
    tracer = provider.get_tracer("t")
    os.kill(child.pid, signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, "tuneloop.tracing"):
            started = time.perf_counter()
            for _ in range(100_000):  # until the socket's buffer (160 to ~6500 spans, net.core.wmem_max) is full
                tracer.start_span("x").end()
                if child.dropped > 1:
                    break
            assert time.perf_counter() - started < 30
        assert child.dropped > 0 and any("span dropped" in r.message for r in caplog.records)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        os.kill(child.pid, signal.SIGCONT)
    child._child.wait(30)
    caplog.clear()
    with caplog.at_level(logging.ERROR, "tuneloop.tracing"):
        for _ in range(3):
            tracer.start_span("x").end()
    assert [r.message for r in caplog.records if "exited" in r.message] == [
        f"tracing: the span export process {child.pid} exited (-9); spans are no longer exported"]
    assert not provider.force_flush(1000)
    provider.shutdown()


def test_tracing_off_imports_no_opentelemetry(tmp_path, tiny_model_dir):
    """Off (no OTEL_* variable): the feedback service serving requests and a pipeline stage import no
    OpenTelemetry SDK, instrumentation or exporter module; the gateway adds no middleware and imports
    neither the instrumentation nor an exporter (its process does hold the SDK's core: `import mlflow`
    imports it, not tuneloop)."""
    from tuneloop.feedback.auth import key_line, new_token

    token = new_token()
    env = _clean_env(TUNELOOP_API_KEYS=key_line("t", ["chat", "feedback", "admin"], token),
                     TUNELOOP_USER_ID_SECRET="s" * 40)
    service = f"""
import json, sys
NOT_WHEN_OFF = {NOT_WHEN_OFF!r}
from fastapi.testclient import TestClient
from tuneloop.config.deploy import AuthConfig, LimitsConfig
from tuneloop.feedback.auth import Guard
from tuneloop.feedback.service import create_feedback_service
from tuneloop.feedback.store import FeedbackStore
from tuneloop.tracing import stage_span
store = FeedbackStore({str(tmp_path / "fb.db")!r})
app = create_feedback_service(store, Guard.from_config(AuthConfig(), LimitsConfig()))
with TestClient(app, headers={{"Authorization": "Bearer {token}"}}) as c:
    assert c.get("/healthz").status_code == 200
    assert c.post("/v1/feedback", json={{"request_id": "nope", "thumbs": "up"}}).status_code == 404
with stage_span("ingest", "a" * 32, "b" * 32) as span:
    assert span is None
print(json.dumps(sorted(m for m in sys.modules if m.startswith(NOT_WHEN_OFF))))
"""
    r = subprocess.run([sys.executable, "-c", service], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []

    config = tiny_config(tmp_path / "gw", tiny_model_dir, data__pii__enabled=False)
    gateway = f"""
import json, sys
NOT_WHEN_OFF = {NOT_WHEN_OFF!r}
from fastapi.testclient import TestClient
from tuneloop import tracing
from tuneloop.config import load_config
from tuneloop.deploy.gateway import Gateway, create_app
class Stub:
    def answer(self, messages, max_tokens):
        return "ok", 3, 1
cfg = load_config({str(config)!r})
gw = Gateway(cfg, backend_factory=lambda v: Stub())
gw.reload()
app = create_app(gw)
with TestClient(app, headers={{"Authorization": "Bearer {token}"}}) as c:
    r = c.post("/v1/chat/completions", json={{"messages": [{{"role": "user", "content": "hi"}}]}})
    assert r.status_code == 200 and len(r.json()["id"]) == 32, r.text
assert tracing._provider is None and not any(n in repr(m) for m in app.user_middleware
                                            for n in ("ServerSpans", "OpenTelemetry"))
print(json.dumps(sorted(m for m in sys.modules if m.startswith(NOT_WHEN_OFF[1:]))))
"""
    r = subprocess.run([sys.executable, "-c", gateway], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_the_tracing_module_is_light():
    """What stages.py pays to import it (it is imported at the top of the stages module)."""
    code = "import json, sys, tuneloop.tracing\nprint(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not {"opentelemetry", "mlflow", "fastapi", "sqlalchemy"} & set(json.loads(r.stdout))

