"""Gateway overhead under load on loopback, with a promotion and a rollback during the load.

Two servers, each one uvicorn process, answer the same OpenAI-shaped JSON:
  bare     a FastAPI endpoint that returns it at once (the baseline: HTTP + JSON only)
  gateway  `tuneloop serve`'s app (bearer-token authentication, routing, sticky split, Prometheus
           metrics, user-id HMAC, request logging to the feedback store - spooled to disk before
           the answer, PII-scrubbed by the writer) over a stub backend that answers at once
An open-loop generator sends --rate requests/s for --seconds to each in turn. During the
gateway's run a canary is deployed (50%), promoted, a second canary deployed and rolled back,
each through the registry and /admin/reload, from a separate process, as the pipeline's tasks do. Prints latency
percentiles of both and, as its last line,
    p99_added_ms=<gateway p99 - bare p99> failed=<failed gateway requests>

Variants of the gateway, compared in one invocation (`--variant A,B,...`; each repeat runs the bare server
and every variant, interleaved, the order reversed on every other repeat so that drift of a shared
machine's load does not favour one):
  tracing-off  the gateway as `tuneloop serve` runs it with no OTEL_* variable (the default)
  tracing-on   the same with OpenTelemetry on through OTEL_EXPORTER_OTLP_ENDPOINT, every request sampled,
               spans exported over OTLP/HTTP to a collector stand-in (its own process, answering 200)
  tracing-sampled  tracing-on keeping 10% of the traces (OTEL_TRACES_SAMPLER=parentbased_traceidratio, 0.1:
               the chart's tracing.sampleRatio)
  hardened     the default gateway (= tracing-off): API-key authentication, request log spooled to disk
  plain        without API-key authentication (deploy.auth.enabled: false) and without the disk spool
               (Gateway(spool=False)): what the hardening costs
With --repeats N each variant's p99 (and p99 over the bare server) is reported as the median and the
spread (min..max) of the N runs, and every further variant against the first as the median of the
per-repeat differences; the last line then reads
    p99_added_ms=<median, first variant> failed=<all runs> p99_delta_ms.<variant>=<median vs the first> ...

    python bench/gateway_load.py [--rate 500] [--seconds 12]
    BENCH_NO_PII=1 python bench/gateway_load.py --no-rollout --variant tracing-off,tracing-on --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PYTHONWARNINGS", "ignore")
ANSWER = {"id": "x", "object": "chat.completion", "model": "m", "usage": {},
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}


class StubBackend:
    def answer(self, messages, max_tokens):  # noqa: ANN001, ANN201
        return "ok", 3, 1


def operate(config: str, url: str) -> None:
    """Child process: performs rollout steps read from stdin (`set ALIAS VERSION`, `del ALIAS`, then a
    reload), as the pipeline's deploy/promote/rollback tasks would from their own pods - so that
    no registry work runs inside the load generator and skews what it measures."""
    import httpx

    from tuneloop.config import load_config
    from tuneloop.registry import Registry

    from tuneloop.feedback.auth import client_headers

    cfg = load_config(config)
    reg = Registry(cfg)
    headers = client_headers(cfg.state_path)  # the gateway's own token (it made it at start)
    gc.freeze()  # its libraries' objects: no full collection of them (~0.15 s of CPU each) during the load
    print("ready", flush=True)
    for line in sys.stdin:
        for op in line.strip().split(";"):
            verb, *rest = op.split()
            reg.set_alias(rest[0], rest[1]) if verb == "set" else reg.delete_alias(rest[0])
        httpx.post(f"{url}/admin/reload", timeout=30, headers=headers).raise_for_status()
        print("done", flush=True)


def collector(port: int) -> None:
    """Child process: stands in for an OpenTelemetry collector's OTLP/HTTP receiver (reads each export,
    answers 200), so that the tracing-on gateway pays for exporting over the network."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Receiver(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 - readiness
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Receiver).serve_forever()


VARIANTS = ("tracing-off", "tracing-on", "tracing-sampled", "hardened", "plain")


def serve(kind: str, port: int, config: str, spool: bool = True) -> None:
    """Child process: one of the servers (the gateway's variant is in its config and environment)."""
    import logging

    import uvicorn
    from fastapi import FastAPI

    logging.basicConfig(level=logging.WARNING)
    if kind == "bare":
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat() -> dict:
            return ANSWER

        @app.get("/healthz")
        def healthz() -> dict:
            return {"status": "ok"}
    else:
        from tuneloop.config import load_config
        from tuneloop.deploy.gateway import SWITCH_INTERVAL_S, Gateway, create_app

        sys.setswitchinterval(SWITCH_INTERVAL_S)  # as `tuneloop serve` does
        gw = Gateway(load_config(config), backend_factory=lambda version: StubBackend(), spool=spool)
        gw.reload()
        app = create_app(gw)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


FAILURES: list[str] = []


class Conn:
    """One keep-alive HTTP/1.1 connection; requests are pre-encoded, responses read by Content-Length
    (a thin client, so the generator itself does not limit the rate)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        return status


async def load(url: str, rate: float, seconds: float, events: list[tuple[float, object]],
               token: str | None = None) -> tuple[list[float], int]:
    import json

    host, port = url.removeprefix("http://").split(":")
    lat: list[float] = []
    failed = 0
    free: collections.deque[Conn] = collections.deque()  # FIFO: every connection stays warm
    reasons = FAILURES

    def encode(i: int) -> bytes:
        body = json.dumps({"messages": [{"role": "user", "content": "where is my parcel?"}], "max_tokens": 4,
                           "user": f"user-{i % 997}"}).encode()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def one(raw: bytes) -> None:
        nonlocal failed
        reused = bool(free)
        conn = free.popleft() if free else Conn(*await asyncio.open_connection(host, int(port)))
        t0 = time.perf_counter()
        try:
            try:
                status = await conn.request(raw)
            except asyncio.IncompleteReadError as e:
                if not (reused and not e.partial):
                    raise
                # the server closed an idle keep-alive connection before answering: reconnect and
                # send again, as HTTP clients do (nothing reached the application)
                conn.writer.close()
                conn = Conn(*await asyncio.open_connection(host, int(port)))
                t0 = time.perf_counter()
                status = await conn.request(raw)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            failed += 1
            reasons.append(f"{type(e).__name__}: {e}")
            conn.writer.close()
            return
        lat.append((time.perf_counter() - t0) * 1000)
        if status != 200:
            failed += 1
            reasons.append(f"HTTP {status}")
        free.append(conn)

    n = int(rate * seconds)
    raws = [encode(i) for i in range(n)]
    tasks = []
    pending = sorted(events, key=lambda e: e[0])
    loop = asyncio.get_running_loop()
    # No garbage collection in the generator while it measures: a full collection of this process's heap (MLflow,
    # the registry: ~0.15-0.2 s here) stalled every request in flight and landed in whichever server's run was on.
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for i in range(n):  # open loop: request i goes out at start + i/rate, whatever the answers do
            while pending and time.perf_counter() - start >= pending[0][0]:
                tasks.append(loop.run_in_executor(None, pending.pop(0)[1]))
            delay = start + i / rate - time.perf_counter()
            await asyncio.sleep(max(delay, 0))
            tasks.append(asyncio.create_task(one(raws[i])))
        await asyncio.gather(*tasks)
    finally:
        gc.enable()
    for c in free:
        c.writer.close()
    return lat, failed


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=500, help="requests per second (open loop)")
    ap.add_argument("--seconds", type=float, default=12, help="duration of each server's load")
    ap.add_argument("--no-rollout", action="store_true",
                    help="no canary deploy/promote/rollback during the load (isolates the steady-state overhead)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each server; medians and spreads over them")
    ap.add_argument("--variant", default="tracing-off",
                    help=f"comma-separated gateway variants to compare in this invocation: {', '.join(VARIANTS)}")
    ap.add_argument("--serve", choices=["bare", "gateway", "collector"], help=argparse.SUPPRESS)
    ap.add_argument("--no-spool", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--operate", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve == "collector":
        collector(args.port)
        return
    if args.serve:
        serve(args.serve, args.port, args.config, spool=not args.no_spool)
        return
    if args.operate:
        operate(args.config, args.operate)
        return

    import httpx
    import yaml

    from tuneloop.config import load_config
    from tuneloop.feedback.auth import client_token
    from tuneloop.registry import TAG_PIPELINE_RUN, Registry
    from tuneloop.tiny import free_port, tiny_run_config

    variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants or len(set(variants)) != len(variants) or args.repeats < 1:
        ap.error(f"--variant: distinct names from {', '.join(VARIANTS)} (got {args.variant!r}); --repeats >= 1")
    root = Path(tempfile.mkdtemp(prefix="tuneloop-gwbench-"))
    no_pii = {"data__pii__enabled": False} if os.environ.get("BENCH_NO_PII") else {}
    config = tiny_run_config(root, root / "unused-model", **no_pii)
    plain_config = root / "config-plain.yaml"  # the same state, authentication off
    raw = yaml.safe_load(config.read_text())
    raw["deploy"].setdefault("auth", {})["enabled"] = False
    plain_config.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(config)
    reg = Registry(cfg)
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    versions = []
    for i in (1, 2):
        parent = reg.start_pipeline_run(f"bench-{i}", f"bench-{i}", {})
        with reg.stage_run(parent, "register") as rid:
            versions.append(str(reg.register(rid, adapter, {TAG_PIPELINE_RUN: parent}).version))
    reg.delete_alias("challenger")

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    sink = None
    if {"tracing-on", "tracing-sampled"} & set(variants):
        sink_port = free_port()
        sink = subprocess.Popen([sys.executable, __file__, "--serve", "collector", "--port", str(sink_port)])
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{sink_port}/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)

    def server(variant: str) -> tuple[list[str], dict[str, str], str | None]:
        """argv tail, environment and bearer token of one server."""
        if variant == "bare":
            return ["--serve", "bare", "--config", str(config)], base_env, None
        if variant == "plain":
            return ["--serve", "gateway", "--no-spool", "--config", str(plain_config)], base_env, None
        env = base_env
        if variant in ("tracing-on", "tracing-sampled"):
            env = {**base_env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                   "OTEL_TRACES_EXPORTER": "otlp", "OTEL_SERVICE_NAME": "tuneloop-gateway-bench"}
        if variant == "tracing-sampled":
            env.update(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.1")
        return ["--serve", "gateway", "--config", str(config)], env, "gateway"

    def run_one(variant: str) -> tuple[list[float], int]:
        reg.delete_alias("canary")  # every run starts from the same routing: the base model, no canary
        reg.delete_alias("champion")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv, env, auth = server(variant)
        proc = subprocess.Popen([sys.executable, __file__, *argv, "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)

            operator = subprocess.Popen([sys.executable, __file__, "--operate", url, "--config", str(config)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=base_env)
            assert operator.stdout is not None and operator.stdin is not None
            operator.stdout.readline()  # "ready": its libraries are loaded before the load starts

            def act(alias_ops: list[tuple[str, str | None]]) -> object:
                def run() -> None:
                    cmd = ";".join(f"set {a} {v}" if v else f"del {a}" for a, v in alias_ops)
                    operator.stdin.write(cmd + "\n")
                    operator.stdin.flush()
                    assert operator.stdout.readline().strip() == "done"
                return run

            d = args.seconds
            events = [] if variant == "bare" or args.no_rollout else [
                (d * 0.2, act([("canary", versions[0])])),                      # deploy canary v1 (50%)
                (d * 0.4, act([("champion", versions[0]), ("canary", None)])),  # promote v1
                (d * 0.6, act([("canary", versions[1])])),                      # deploy canary v2
                (d * 0.8, act([("canary", None)])),                             # roll v2 back
            ]
            token = client_token(cfg.state_path) if auth else None
            asyncio.run(load(url, args.rate, 1.0, [], token))  # warm-up
            lat, failed = asyncio.run(load(url, args.rate, d, events, token))
            operator.stdin.close()
            operator.wait(10)
            if variant != "bare" and not args.no_rollout:
                state = httpx.get(f"{url}/healthz").json()
                assert state["champion"] == versions[0] and state["canary"] is None, state
            return lat, failed
        finally:
            proc.terminate()
            proc.wait(10)

    runs: dict[str, list[tuple[list[float], int]]] = {k: [] for k in ("bare", *variants)}
    try:
        for r in range(args.repeats):
            order = variants if r % 2 == 0 else variants[::-1]
            for kind in ("bare", *order):
                lat, failed = run_one(kind)
                runs[kind].append((lat, failed))
                print(f"run {r + 1}/{args.repeats} {kind:11s} n={len(lat):5d} failed={failed} p50={pct(lat, .5):6.2f} "
                      f"ms p90={pct(lat, .9):6.2f} ms p99={pct(lat, .99):6.2f} ms mean={statistics.mean(lat):6.2f} ms",
                      flush=True)
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait(10)

    def spread(xs: list[float]) -> str:
        return f"median {statistics.median(xs):6.2f} ms (spread {min(xs):.2f}..{max(xs):.2f}; runs " \
               f"{' '.join(f'{x:.2f}' for x in xs)})"

    p99 = {k: [pct(lat, .99) for lat, _ in v] for k, v in runs.items()}
    added = {k: [g - b for g, b in zip(p99[k], p99["bare"])] for k in variants}
    for kind in ("bare", *variants):
        print(f"{kind:11s} p99 {spread(p99[kind])}")
    for kind in variants:
        print(f"{kind:11s} p99 - bare p99 {spread(added[kind])}")
    deltas = {k: [x - y for x, y in zip(p99[k], p99[variants[0]])] for k in variants[1:]}
    for kind, xs in deltas.items():
        print(f"{kind} - {variants[0]} p99 (paired per repeat) {spread(xs)}")
    if FAILURES:
        print("failures:", sorted(set(FAILURES)))
    print(f"rate {args.rate:.0f} req/s for {args.seconds:.0f} s each, {args.repeats} repeat(s); " + (
        "no rollout during the load" if args.no_rollout else f"during each gateway run: canary v{versions[0]} "
        f"deployed, promoted; canary v{versions[1]} deployed, rolled back"))
    failed = sum(f for k in variants for _, f in runs[k])
    print(f"p99_added_ms={statistics.median(added[variants[0]]):.2f} failed={failed}"
          + "".join(f" p99_delta_ms.{k}={statistics.median(xs):.2f}" for k, xs in deltas.items()))


if __name__ == "__main__":
    main()
