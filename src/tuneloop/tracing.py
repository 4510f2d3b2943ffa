"""OpenTelemetry tracing: off by default, on through the standard OTEL_* environment variables.

Off (no OTEL_* variable asks for traces) costs nothing: this module imports no OpenTelemetry
package, the apps get no middleware and `stage_span` is an empty context manager. On when
  OTEL_TRACES_EXPORTER names an exporter (`otlp`, `console`; `none` keeps it off), or
  OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (the exporter is then `otlp`),
and never while OTEL_SDK_DISABLED=true. The SDK reads the rest itself: the OTLP/HTTP exporter its
endpoint, headers, timeout and compression (OTEL_EXPORTER_OTLP_*; only http/protobuf is installed),
the sampler (OTEL_TRACES_SAMPLER, _ARG; default parent-based always-on), the batch processor
(OTEL_BSP_*), the resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES; without a service name each
process names itself: tuneloop-gateway, tuneloop-feedback, tuneloop-pipeline).

What is traced:
- the gateway and the feedback service: a server span per request (`ServerSpans`; /healthz and /metrics
  left out), with the request's variant, model version and request id as attributes. With tracing on,
  the gateway's request ids are the server span's trace id + span id (48 hex characters; the first 32
  are the trace id), so every row of the request log names its trace without a new column;
  `trace_id_of(request_id)` reads it back. Feedback on a request links its span to that request's span.
- pipeline stages: `stage_span(stage, mlflow_run_id, parent_run_id)` around each stage, attribute
  `mlflow.run_id`. The stages of one pipeline run share one trace, whose id is the MLflow parent run
  id (a uuid4 hex), whichever pod runs them: the trace of a run is found by its MLflow run id.

What it costs a server, and why it is built so (budget: at most 0.3 ms of added p99 at 500 requests/s in
bench/gateway_load.py; all figures measured on the 2-core development VM):
- The server span is `ServerSpans`, a pure ASGI middleware on the OpenTelemetry API/SDK, in place of
  opentelemetry-instrumentation-fastapi's FastAPIInstrumentor (0.66b2), which added ~0.17-0.29 ms of CPU to a
  chat request: its route lookup matches the request against every route of the app again (`Route.matches`,
  once per route), it collects 14 attributes (old and new HTTP conventions, peer, host...) and wraps every
  receive/send. `ServerSpans` adds ~22 us (a span with 5 attributes, the trace context read by
  `propagate.extract`, the route taken from the scope where Starlette left it), and its smaller spans encode in
  ~31-35 us instead of ~50 us. Recent FastAPI makes spans of its own once a global tracer provider is set;
  `instrument_app` turns those off for the app, so a request has one server span.
- Its spans are exported by a child process (`ExportProcess`), not by the SDK's BatchSpanProcessor thread in the
  server: OTLP encoding and the HTTP request are Python holding the GIL (~35-53 us per span), and while that
  thread ran, every wake-up of the event loop waited up to the switch interval (0.5 ms in the gateway) for the
  GIL. A thread waking 500 times a second, making a span and working 0.3 ms (SCHED_FIFO, so that other load
  does not blur it) woke late by p99 0.11-0.13 ms without tracing, 0.08-0.18 ms exporting through the child,
  0.63-0.71 ms exporting in a thread (batches of 32; of 512: p99.9 11-18 ms). Handing a span over costs the
  server ~15 us.
- bench/gateway_load.py, the old and the new tracing interleaved in one run (3 repeats, the machine otherwise
  quiet): at 500 requests/s tracing-on minus tracing-off p99 was -0.05 ms (runs -0.05/-0.05/0.53), the old one
  +3.33 ms (2.15..4.19); at 150/s +0.25 ms (-0.10..1.51), the old one +1.99 ms (1.06..2.51). While other work
  kept the 2 cores busy (load ~2), +0.2 to +1.9 ms: the p99 of the bare server moved by as much.

If tracing is asked for but OpenTelemetry is not installed, the process logs it once and runs untraced.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("tuneloop.tracing")
EXCLUDED_URLS = "/healthz,/metrics"  # probes and scrapes: a span each would bury the requests
# The batch processor's defaults unless OTEL_BSP_* says otherwise. In a thread of a serving process (pipeline
# stages; servers where no export process can start): small batches, often - the SDK's 512-span batches held the
# GIL long enough to put 11-18 ms on the event loop's p99.9 (measured here). In the export process, where the GIL
# is its own, large ones: an OTLP request per 512 spans costs ~35 us of CPU per span, per 32 spans ~53 us (the
# HTTP request's own Python is ~0.6 ms); spans reach the collector at most a second late.
BSP_DEFAULTS = {"OTEL_BSP_SCHEDULE_DELAY": 200, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 32}
EXPORT_PROCESS_BSP_DEFAULTS = {"OTEL_BSP_SCHEDULE_DELAY": 1000, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512}
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX48 = re.compile(r"[0-9a-f]{48}")

_lock = threading.Lock()
_checked = False  # the environment was read (once per process)
_provider: Any | None = None  # the SDK TracerProvider when tracing is on


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* environment asks for traces (see the module docstring)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER")
    if exporters is not None and exporters.strip():
        return any(e.strip().lower() not in ("", "none") for e in exporters.split(","))
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def tracer_provider(service_name: str = "tuneloop", export_process: bool = False) -> Any | None:
    """This process's SDK TracerProvider, set up from the environment at the first call (also made the
    global one); None when tracing is off. `service_name` applies unless the environment names one.
    `export_process` (servers): its spans are exported by a child process (`ExportProcess`) rather than by
    a thread of this one; applies at the first call."""
    global _checked, _provider
    if _checked:
        return _provider
    with _lock:
        if not _checked:
            _provider = _from_environment(service_name, export_process) if enabled() else None
            _checked = True
    return _provider


def _from_environment(service_name: str, export_process: bool) -> Any | None:
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError as e:
        log.error("tracing: OTEL_* asks for traces but OpenTelemetry is not installed (%s); running untraced", e)
        return None
    provider = TracerProvider(resource=_resource(service_name))
    names = [n for n in (e.strip().lower() for e in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(","))
             if _supported(n)]
    child = ExportProcess.start(provider.resource, names) if export_process and names else None
    if child is not None:
        provider.add_span_processor(child)
    else:
        for processor in _batch_processors(names):
            provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    log.info("tracing on: service %s, exporters %s%s", provider.resource.attributes.get("service.name"),
             ",".join(names) or "none", f", exported by process {child.pid}" if child is not None else "")
    return provider


def _supported(name: str) -> bool:
    if name in ("otlp", "console"):
        return True
    if name not in ("", "none"):
        log.error("tracing: exporter %r in OTEL_TRACES_EXPORTER is not supported (otlp, console, none)", name)
    return False


def _batch_processors(names: list[str], defaults: Mapping[str, int] = BSP_DEFAULTS) -> list[Any]:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    def setting(name: str) -> str | int:
        return os.environ.get(name, "").strip() or defaults[name]

    return [BatchSpanProcessor(_exporter(name), schedule_delay_millis=float(setting("OTEL_BSP_SCHEDULE_DELAY")),
                               max_export_batch_size=int(setting("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")))
            for name in names]


def _resource(service_name: str) -> Any:
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    return resource


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        log.error("tracing: OTLP protocol %s is not installed; sending http/protobuf (the collector's port 4318)",
                  protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, compression from OTEL_EXPORTER_OTLP_*


def configure(exporter: Any, service_name: str = "tuneloop") -> Any:
    """Tracing on in this process with `exporter`, each span exported as it ends (tests: an in-memory
    exporter); replaces what the environment set up. Returns the provider (not made the global one)."""
    global _checked, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with _lock:
        _provider, _checked = provider, True
    return provider


def reset() -> None:
    """Forget the set-up (the environment is read again at the next use); flushes and shuts down a provider."""
    global _checked, _provider
    with _lock:
        old, _provider, _checked = _provider, None, False
    if old is not None:
        old.shutdown()


# -- servers --------------------------------------------------------------------------------------
def instrument_app(app: Any, service_name: str) -> bool:
    """A server span per request of this FastAPI (or any Starlette) app when tracing is on (`ServerSpans`);
    False (nothing done) when off."""
    provider = tracer_provider(service_name, export_process=True)
    if provider is None:
        return False
    telemetry = getattr(app, "_telemetry", None)
    if isinstance(telemetry, dict):
        # FastAPI's own OpenTelemetry spans (recent FastAPI: on by itself once a global tracer provider is set):
        # ServerSpans makes the server span, so FastAPI would only add a second one and per-operation spans
        telemetry["tracing"] = False
    excluded = os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", "").strip()
    app.add_middleware(ServerSpans, tracer=provider.get_tracer("tuneloop.tracing"),
                       excluded_urls=excluded or EXCLUDED_URLS, regex=bool(excluded))
    return True


_KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
_asgi_getter: Any | None = None


def _headers_getter() -> Any:
    """The propagators' Getter over ASGI headers (a list of lower-case (name, value) byte pairs)."""
    global _asgi_getter
    if _asgi_getter is None:
        from opentelemetry.propagators.textmap import Getter

        class AsgiHeaders(Getter):
            def get(self, carrier: Any, key: str) -> list[str] | None:
                name = key.lower().encode("latin-1")
                return [v.decode("latin-1") for n, v in carrier if n == name] or None

            def keys(self, carrier: Any) -> list[str]:
                return [n.decode("latin-1") for n, _ in carrier]

        _asgi_getter = AsgiHeaders()
    return _asgi_getter


class ServerSpans:
    """Pure ASGI middleware: a SERVER span per HTTP request, the current span while the app handles it.

    Parent: the request's W3C trace context, read by the configured propagators (`propagate.extract`,
    OTEL_PROPAGATORS). Name `METHOD route`; attributes (stable HTTP semantic conventions)
    `http.request.method`, `url.scheme`, `url.path`, `http.route` (the matched route's template, which
    Starlette leaves in the scope), `http.response.status_code`; status ERROR and `error.type` on a 5xx
    answer or an exception (recorded on the span). Paths in `excluded_urls` (comma-separated; regexes
    searched in the path when `regex`) get no span. Websockets and lifespan pass through."""

    def __init__(self, app: Any, tracer: Any, excluded_urls: str = EXCLUDED_URLS, regex: bool = False) -> None:
        from opentelemetry import context, propagate, trace
        from opentelemetry.trace import SpanKind, StatusCode

        self.app = app
        self._tracer = tracer
        self._attach, self._detach = context.attach, context.detach
        self._extract, self._getter = propagate.extract, _headers_getter()
        self._in_context, self._server, self._error = trace.set_span_in_context, SpanKind.SERVER, StatusCode.ERROR
        urls = [u.strip() for u in excluded_urls.split(",") if u.strip()]
        if regex:
            pattern = re.compile("|".join(f"(?:{u})" for u in urls))
            self._excluded: Any = lambda path: pattern.search(path) is not None
        else:
            self._excluded = frozenset(urls).__contains__

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._excluded(scope["path"]):
            await self.app(scope, receive, send)
            return
        parent = self._extract(scope["headers"], getter=self._getter)
        method = scope["method"]
        attributes = {"http.request.method": method if method in _KNOWN_METHODS else "_OTHER",
                      "url.scheme": scope.get("scheme", "http"), "url.path": scope["path"]}
        if method not in _KNOWN_METHODS:
            attributes["http.request.method_original"] = method
            method = "HTTP"
        span = self._tracer.start_span(method, parent, self._server, attributes)
        token = self._attach(self._in_context(span, parent))
        status = 0

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: str | None = None
        try:
            await self.app(scope, receive, send_status)
        except BaseException as e:
            error = type(e).__qualname__ if type(e).__module__ == "builtins" else \
                f"{type(e).__module__}.{type(e).__qualname__}"
            if isinstance(e, Exception):
                span.record_exception(e)
            raise
        finally:
            self._detach(token)
            end: dict[str, Any] = {}
            route = getattr(scope.get("route"), "path", None)
            if route:
                end["http.route"] = route
                span.update_name(f"{method} {route}")
            if status:
                end["http.response.status_code"] = status
            if error is None and (status >= 500 or not status):
                error = str(status) if status else "incomplete_response"
            if error is not None:
                end["error.type"] = error
                span.set_status(self._error)
            span.set_attributes(end)
            span.end()


# -- the export process ----------------------------------------------------------------------------
_RECV_BYTES = 1 << 18  # the largest span record taken (a unix socket's send buffer, ~208 KiB, is smaller)
_SEND_BUFFER = 4 << 20  # bytes asked for the socket's send buffer: ~3000 spans where net.core.wmem_max allows
_DRAIN_S = 0.025  # the export process reads what 25 ms brought at once: ~160 spans fit, 6400 a second
_span_processor_class: Any | None = None


class ExportProcess:
    """Spans of a server exported by a child process, through the SDK's BatchSpanProcessor and OTLP exporter there.

    Encoding a span for OTLP and posting batches is Python that holds the GIL: in a thread of the server, every
    wake-up of the event loop during an export waited up to the switch interval for it. Here each ended span costs
    the server a plain tuple, pickled and sent as one datagram over a unix socket pair (~15 us). Sending never
    blocks: when the child is behind by a full socket buffer (~160 spans at Linux's default net.core.wmem_max,
    ~6500 where it allows the 4 MiB asked for), the span is dropped and counted in the log. The child, at nice +10,
    reads what each 25 ms brought at once, rebuilds each span as an SDK `ReadableSpan` with this process's resource
    and hands it to its batch processors; it exits, after exporting what it holds, when the server's end of the
    socket closes (shutdown or the server's death), and ignores SIGINT so that a Ctrl-C's shutdown still flushes.
    It costs ~35 MB of memory and ~65 us of CPU per span (measured at 500 spans/s)."""

    pid: int

    @classmethod
    def start(cls, resource: Any, exporters: list[str]) -> Any | None:
        """The span processor feeding a new export process; None (export in this process) where unix
        SOCK_SEQPACKET sockets or a child process are not to be had."""
        import pickle
        import socket
        import subprocess
        import sys
        from pathlib import Path

        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except (AttributeError, OSError) as e:
            log.info("tracing: no unix SOCK_SEQPACKET socket pair (%s); exporting spans in this process", e)
            return None
        # this package's folder last on the child's path: found there if the environment does not find it first
        code = "import sys; sys.path.append(sys.argv[2]); import tuneloop.tracing as t; t.export_process_main()"
        try:
            with theirs:
                child = subprocess.Popen(
                    [sys.executable, "-c", code, str(theirs.fileno()), str(Path(__file__).resolve().parents[1])],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as e:
            ours.close()
            log.error("tracing: the span export process did not start (%s); exporting spans in this process", e)
            return None
        ours.sendall(pickle.dumps((dict(resource.attributes), resource.schema_url, exporters)))
        ours.setblocking(False)
        try:  # room for a few seconds of spans while the export process waits for a core (net.core.wmem_max caps it)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        except OSError:
            pass
        return _processor_class()(ours, child)


def _processor_class() -> Any:
    global _span_processor_class
    if _span_processor_class is not None:
        return _span_processor_class
    import pickle
    import select

    from opentelemetry.sdk.trace import SpanProcessor

    dumps, protocol = pickle.dumps, pickle.HIGHEST_PROTOCOL

    class ExportProcessor(SpanProcessor, ExportProcess):
        def __init__(self, sock: Any, child: Any) -> None:
            self._sock, self._child, self.pid, self._owner = sock, child, child.pid, os.getpid()
            self._send, self._dead, self.dropped, self._flushes = sock.send, False, 0, 0
            self._flush_lock = threading.Lock()

        def on_end(self, span: Any) -> None:
            if self._dead or not span.context.trace_flags.sampled:
                return
            c, parent, scope = span.context, span.parent, span.instrumentation_scope
            record = (span.name, c.trace_id, c.span_id, int(c.trace_flags),
                      list(c.trace_state.items()) if c.trace_state else None,
                      (parent.trace_id, parent.span_id, parent.is_remote) if parent is not None else None,
                      dict(span.attributes) if span.attributes else None,
                      [(e.name, dict(e.attributes) if e.attributes else None, e.timestamp) for e in span.events],
                      [(k.context.trace_id, k.context.span_id, int(k.context.trace_flags),
                        dict(k.attributes) if k.attributes else None) for k in span.links],
                      span.kind.value, span.status.status_code.value, span.status.description, span.start_time,
                      span.end_time, scope.name if scope else "", scope.version if scope else None,
                      scope.schema_url if scope else None)
            try:
                self._send(dumps(record, protocol))
            except BlockingIOError:
                self._drop("the export process is behind")
            except (BrokenPipeError, ConnectionError):
                self._gone()
            except OSError as e:  # a span larger than the socket's buffer
                self._drop(str(e))

        def _drop(self, why: str) -> None:
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # the 1st, 2nd, 4th, 8th... drop
                log.warning("tracing: span dropped (%s); %d so far", why, self.dropped)

        def _gone(self) -> None:
            if not self._dead:
                self._dead = True
                log.error("tracing: the span export process %d exited (%s); spans are no longer exported",
                          self.pid, self._child.poll())

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            """Waits until the export process has exported what it was sent."""
            deadline = time.monotonic() + timeout_millis / 1000
            with self._flush_lock:
                if self._dead:
                    return False
                self._flushes += 1
                token = b"F%d" % self._flushes
                try:
                    while True:
                        try:
                            self._send(token)
                            break
                        except BlockingIOError:
                            if not select.select([], [self._sock], [], max(0.0, deadline - time.monotonic()))[1]:
                                return False
                    while (left := deadline - time.monotonic()) > 0:
                        if select.select([self._sock], [], [], left)[0]:
                            try:
                                if self._sock.recv(64) == token:
                                    return True
                            except BlockingIOError:
                                pass
                except (BrokenPipeError, ConnectionError):
                    self._gone()
                return False

        def shutdown(self) -> None:
            """Closes this end: the export process exports what it holds and exits (waited for up to 10 s)."""
            if self._dead:
                return
            self._dead = True
            self._sock.close()
            if os.getpid() == self._owner:
                try:
                    self._child.wait(10)
                except Exception:  # noqa: BLE001 - it still exits by itself
                    log.warning("tracing: the span export process %d is still exporting", self.pid)

    _span_processor_class = ExportProcessor
    return ExportProcessor


def _below_the_server() -> None:
    """This process at a lower CPU priority than the server that started it (nice +10, and a time-sharing policy
    should the server run a real-time one): an export of a batch is a burst of CPU that would otherwise delay
    the server's requests on a busy machine; it waits for a free core instead."""
    try:
        if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.nice(10)
    except OSError:
        pass


def export_process_main() -> None:
    """The export process (`ExportProcess`): argv[1] is its end of the socket pair."""
    import pickle
    import signal
    import socket
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _below_the_server()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.setblocking(True)
    buffer = bytearray(_RECV_BYTES)
    view = memoryview(buffer)
    attributes, schema_url, names = pickle.loads(view[:sock.recv_into(buffer)])

    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    resource = Resource(attributes, schema_url)
    processors = _batch_processors(names, EXPORT_PROCESS_BSP_DEFAULTS)
    scopes: dict[tuple[Any, ...], Any] = {}

    def context(trace_id: int, span_id: int, flags: int, remote: bool, state: Any = None) -> Any:
        return trace.SpanContext(trace_id, span_id, remote, trace.TraceFlags(flags),
                                 trace.TraceState(state) if state else None)

    def handle(n: int) -> None:
        if buffer[0] == 0x46:  # b"F...": a flush, answered when done
            for processor in processors:
                processor.force_flush()
            sock.sendall(bytes(view[:n]))
            return
        try:
            (name, trace_id, span_id, flags, state, parent, attrs, events, links, kind, code, description, start,
             end, scope_name, scope_version, scope_schema) = pickle.loads(view[:n])
            key = (scope_name, scope_version, scope_schema)
            scope = scopes.get(key) or scopes.setdefault(key, InstrumentationScope(*key))
            span = ReadableSpan(
                name, context(trace_id, span_id, flags, False, state),
                context(parent[0], parent[1], 0, parent[2]) if parent else None, resource, attrs,
                [Event(e[0], e[1], e[2]) for e in events],
                [trace.Link(context(*k[:3], True), k[3]) for k in links],
                trace.SpanKind(kind), status=trace.Status(trace.StatusCode(code), description), start_time=start,
                end_time=end, instrumentation_scope=scope)
        except Exception:  # noqa: BLE001 - one bad record must not stop the export
            log.exception("tracing: a span record could not be read")
            return
        for processor in processors:
            processor.on_end(span)

    # Read in bursts: a blocking read while the server is idle, then what arrives in the next _DRAIN_S at once -
    # this process wakes at most 1/_DRAIN_S times a second under load instead of once a span (each wake-up of a
    # process is one the server's cores pay for too).
    while n := sock.recv_into(buffer):
        while n:
            handle(n)
            try:
                n = sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                time.sleep(_DRAIN_S)
                try:
                    n = sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
        else:
            break  # the server's end closed
    for processor in processors:
        processor.shutdown()


def request_id() -> str:
    """A new request id: the current span's trace id + span id (48 hex) when there is one, else a uuid4 hex."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return uuid.uuid4().hex
    return f"{ctx.trace_id:032x}{ctx.span_id:016x}"


def trace_id_of(request_id: str) -> str | None:
    """The trace id (32 hex) a request id made by `request_id()` carries; None for a plain uuid."""
    return request_id[:32] if _HEX48.fullmatch(request_id or "") else None


def annotate(attributes: dict[str, Any], link_request: str | None = None) -> None:
    """Attributes on the current span (request id, variant, version); `link_request`: a request id made by
    `request_id()`, whose span this one is linked to (feedback -> the request it rates). Nothing when off."""
    if _provider is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if link_request and _HEX48.fullmatch(link_request):
        span.add_link(trace.SpanContext(int(link_request[:32], 16), int(link_request[32:], 16), is_remote=True,
                                        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)))


# -- pipeline stages ------------------------------------------------------------------------------
@contextmanager
def stage_span(stage: str, mlflow_run_id: str | None = None, parent_run_id: str | None = None,
               **attributes: Any) -> Iterator[Any]:
    """A span around one pipeline stage (None inside when tracing is off), attributes `tuneloop.stage`,
    `mlflow.run_id` (the stage's run) and `mlflow.parent_run_id`. Without a current span, its trace id
    is the parent run id when that is a uuid hex (MLflow's run ids are), so every stage of a pipeline
    run - each in its own pod - lands in one trace named by the MLflow run. An exception is recorded
    on the span (status ERROR) and raised. Spans are flushed when the stage ends: a task's process
    may exit right after."""
    provider = tracer_provider("tuneloop-pipeline")
    if provider is None:
        yield None
        return
    from opentelemetry import context, trace

    attrs = {"tuneloop.stage": stage, "mlflow.run_id": mlflow_run_id, "mlflow.parent_run_id": parent_run_id,
             **attributes}
    parent = None
    if not trace.get_current_span().get_span_context().is_valid and parent_run_id \
            and _HEX32.fullmatch(parent_run_id.lower()):
        # the pipeline run's (never exported) root: trace id = the MLflow parent run id
        root = trace.SpanContext(int(parent_run_id, 16), int(parent_run_id[:16], 16) or 1, is_remote=True,
                                 trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
        parent = trace.set_span_in_context(trace.NonRecordingSpan(root), context.get_current())
    tracer = provider.get_tracer("tuneloop.stages")
    try:
        with tracer.start_as_current_span(f"stage {stage}", context=parent,
                                          attributes={k: v for k, v in attrs.items() if v is not None}) as span:
            yield span
    finally:
        provider.force_flush(5000)
