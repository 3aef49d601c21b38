"""The serving side of the flows: the serve CLI (`python -m pipelines.serve`) and a smoke test of its endpoint.

Ray Serve deploys and rolls over the app; the flows only call its CLI and then check the live endpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import httpx

from pipelines.common.params import ServeParams


@dataclass(frozen=True)
class Smoke:
    endpoint: str
    model: str  # the id /v1/models names
    version: str | None  # the registry version it reports, when it does
    completion: str


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
    """The registry version the live endpoint serves, or None when nothing answers."""
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers(), timeout=5)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return _version(response.json())


def _version(models: dict) -> str | None:
    for entry in models.get("data", []):
        for key in ("version", "registry_version", "model_version"):
            for holder in (entry, entry.get("metadata") or {}):
                if holder.get(key) is not None:
                    return str(holder[key])
    return None


def smoke_test(url: str, prompt: str = "The king") -> Smoke:
    """GET /health, GET /v1/models and one short POST /v1/completions; raise with the response when one fails."""
    with httpx.Client(base_url=url, headers=headers(), timeout=60) as client:
        health = client.get("/health")
        if health.status_code != 200:
            raise RuntimeError(f"{url}/health answered {health.status_code}: {health.text[:300]}")
        models = client.get("/v1/models")
        models.raise_for_status()
        listing = models.json()
        model = listing["data"][0]["id"]
        completion = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8})
        if completion.status_code != 200:
            raise RuntimeError(f"{url}/v1/completions answered {completion.status_code}: {completion.text[:300]}")
        text = completion.json()["choices"][0]["text"]
    return Smoke(url, model, _version(listing), text)
