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
- the gateway and the feedback service: a server span per request (FastAPI instrumentation; /healthz
  and /metrics left out, no per-message receive/send spans), with the request's variant, model version
  and request id as attributes. With tracing on, the gateway's request ids are the server span's trace
  id + span id (48 hex characters; the first 32 are the trace id), so every row of the request log
  names its trace without a new column; `trace_id_of(request_id)` reads it back. Feedback on a request
  links its span to that request's span.
- pipeline stages: `stage_span(stage, mlflow_run_id, parent_run_id)` around each stage, attribute
  `mlflow.run_id`. The stages of one pipeline run share one trace, whose id is the MLflow parent run
  id (a uuid4 hex), whichever pod runs them: the trace of a run is found by its MLflow run id.

If tracing is asked for but OpenTelemetry is not installed, the process logs it once and runs untraced.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("tuneloop.tracing")
EXCLUDED_URLS = "/healthz,/metrics"  # probes and scrapes: a span each would bury the requests
# The batch processor's defaults unless OTEL_BSP_* says otherwise: small batches, often. Encoding a span for
# OTLP takes ~90 us of Python holding the GIL; the SDK's default 512-span batches stalled the gateway's event
# loop for ~45 ms each (measured here), which is what its p99 saw.
BSP_DEFAULTS = {"OTEL_BSP_SCHEDULE_DELAY": 200, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 32}
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


def tracer_provider(service_name: str = "tuneloop") -> Any | None:
    """This process's SDK TracerProvider, set up from the environment at the first call (also made the
    global one); None when tracing is off. `service_name` applies unless the environment names one."""
    global _checked, _provider
    if _checked:
        return _provider
    with _lock:
        if not _checked:
            _provider = _from_environment(service_name) if enabled() else None
            _checked = True
    return _provider


def _from_environment(service_name: str) -> Any | None:
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        log.error("tracing: OTEL_* asks for traces but OpenTelemetry is not installed (%s); running untraced", e)
        return None
    provider = TracerProvider(resource=_resource(service_name))
    names = [e.strip().lower() for e in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")]
    for name in names:
        exporter = _exporter(name)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(
                exporter, schedule_delay_millis=float(_env_or_default("OTEL_BSP_SCHEDULE_DELAY")),
                max_export_batch_size=int(_env_or_default("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"))))
    trace.set_tracer_provider(provider)
    log.info("tracing on: service %s, exporters %s", provider.resource.attributes.get("service.name"),
             ",".join(n for n in names if n != "none"))
    return provider


def _env_or_default(name: str) -> str | int:
    value = os.environ.get(name, "").strip()
    return value if value else BSP_DEFAULTS[name]


def _resource(service_name: str) -> Any:
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    return resource


def _exporter(name: str) -> Any | None:
    if name == "none":
        return None
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        log.error("tracing: exporter %r in OTEL_TRACES_EXPORTER is not supported (otlp, console, none)", name)
        return None
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
    """A server span per request of this FastAPI app when tracing is on; False (nothing done) when off."""
    provider = tracer_provider(service_name)
    if provider is None:
        return False
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.metrics import NoOpMeterProvider
    except ImportError as e:
        log.error("tracing: opentelemetry-instrumentation-fastapi is not installed (%s); %s runs untraced",
                  e, service_name)
        return False
    excluded = None if os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS") else EXCLUDED_URLS
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, meter_provider=NoOpMeterProvider(),
                                       excluded_urls=excluded, exclude_spans=["receive", "send"])
    return True


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
