"""Prometheus metrics of the server, exported through Ray's metrics agent (scrape each node's
--metrics-export-port; names get Ray's `ray_` prefix there, e.g. `ray_quill_requests_total`)."""

from __future__ import annotations

import time

from ray.serve import metrics

# Buckets for per-request latencies (seconds): from one fast decode step to a long CPU generation.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]

REQUESTS = metrics.Counter("quill_requests", "HTTP requests by route and status code", tag_keys=("route", "status"))
ERRORS = metrics.Counter("quill_errors", "requests that failed inside the engine or mid-stream", tag_keys=("kind",))
QUEUE_LENGTH = metrics.Gauge("quill_queue_length", "requests waiting for a KV-cache slot")
RUNNING = metrics.Gauge("quill_running_batch_size", "sequences decoded together in the last step")
TTFT = metrics.Histogram(
    "quill_time_to_first_token_seconds", "request arrival to its first token", boundaries=LATENCY_BUCKETS
)
TPOT = metrics.Histogram(
    "quill_time_per_output_token_seconds", "mean time between a request's tokens", boundaries=LATENCY_BUCKETS
)
GENERATED = metrics.Counter("quill_generated_tokens", "tokens generated")
CANCELLED = metrics.Counter("quill_cancelled_requests", "sequences dropped because their client went away")


class CountRequests:
    """ASGI middleware: one REQUESTS increment per HTTP response, tagged with its route and status."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # FastAPI's matched route: bounded cardinality
            REQUESTS.inc(tags={"route": route, "status": str(status["code"])})


class Timing:
    """When a sequence started and produced its first token, for TTFT and TPOT."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first: float | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            TTFT.observe(self.first - self.start)

    def done(self, n_tokens: int) -> None:
        if n_tokens:  # Ray's Counter refuses inc(0)
            GENERATED.inc(n_tokens)
        if self.first is not None and n_tokens > 1:
            TPOT.observe((time.perf_counter() - self.first) / (n_tokens - 1))
