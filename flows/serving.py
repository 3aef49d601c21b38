"""The serving side of the flows: the serve CLI (`python -m pipelines.serve`) and a smoke test of its endpoint.

Ray Serve deploys and rolls over the app, the base model's champion and, once registry.chat_model_name has one, the
chat model's beside it (a deploy restarts only a model whose version changed); the flows only call its CLI and
then check the live endpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, replace

import httpx

from pipelines.common.contracts import CHAMPION
from pipelines.common.params import ServeParams, load_params
from pipelines.common.tracking import mlflow_client, version_by_alias


@dataclass(frozen=True)
class Smoke:
    endpoint: str
    model: str  # the id /v1/models names first: the base model
    version: str | None  # the registry version it reports, when it does
    completion: str
    chat: str | None = None  # the chat model's reply, when one is served beside it (its id, version: chat_model)
    chat_model: str | None = None


def endpoint(serve: ServeParams) -> str:
    host = "127.0.0.1" if serve.host in ("0.0.0.0", "::") else serve.host
    return f"http://{host}:{serve.port}"


def serve_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m pipelines.serve <args>` in the current directory, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def headers() -> dict[str, str]:
    key = os.environ.get("QUILL_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def served_version(url: str) -> str | None:
    """The registry version of the base model the live endpoint serves, or None when nothing answers, or when it
    does not serve the chat model params.yaml names beside it (serve.chat_model set, or a champion of
    registry.chat_model_name other than the one it serves): a caller that deploys unless the endpoint serves the
    champion then deploys, and with it the chat model's new champion (the base model's replicas stay as they are)."""
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers(), timeout=5)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    listing = response.json()
    params = load_params()
    if params.serve.chat_model is not None:
        return None
    chat = version_by_alias(mlflow_client(), params.registry.chat_model_name, CHAMPION)
    served = {(m.get("id"), str(m.get("version"))) for m in listing.get("data", [])[1:]}
    if chat is not None and (chat.name, str(chat.version)) not in served:
        return None
    return _version(listing)


def _version(models: dict) -> str | None:
    for entry in models.get("data", []):
        for key in ("version", "registry_version", "model_version"):
            for holder in (entry, entry.get("metadata") or {}):
                if holder.get(key) is not None:
                    return str(holder[key])
    return None


def smoke_test(url: str, prompt: str = "The king") -> Smoke:
    """GET /health, GET /v1/models and one short POST /v1/completions of the base model, and when a chat model is
    served beside it, one short POST /v1/chat/completions of that; raise with the response when one fails."""
    with httpx.Client(base_url=url, headers=headers(), timeout=60) as client:
        health = client.get("/health")
        if health.status_code != 200:
            raise RuntimeError(f"{url}/health answered {health.status_code}: {health.text[:300]}")
        models = client.get("/v1/models")
        models.raise_for_status()
        base, *others = models.json()["data"]
        completion = client.post("/v1/completions", json={"model": base["id"], "prompt": prompt, "max_tokens": 8})
        if completion.status_code != 200:
            raise RuntimeError(f"{url}/v1/completions answered {completion.status_code}: {completion.text[:300]}")
        smoke = Smoke(url, base["id"], _version({"data": [base]}), completion.json()["choices"][0]["text"])
        for chat in others:
            messages = [{"role": "user", "content": prompt}]
            reply = client.post(
                "/v1/chat/completions", json={"model": chat["id"], "messages": messages, "max_tokens": 8}
            )
            if reply.status_code != 200:
                raise RuntimeError(f"{url}/v1/chat/completions answered {reply.status_code}: {reply.text[:300]}")
            chat_model = f"{chat['id']} (version {_version({'data': [chat]})})"
            smoke = replace(smoke, chat=reply.json()["choices"][0]["message"]["content"], chat_model=chat_model)
    return smoke
