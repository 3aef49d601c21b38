"""The endpoint's API key at the edge (pipelines/serve/edge.py): the digest the replicas expect, and the middleware
accepts exactly `Authorization: Bearer <key>`. That the replicas get only its sha256: test_init.py. End to end over
Ray Serve: tests/integration/test_serve.py (`auth`)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipelines.serve.edge import EdgeGuard, expected_key_digest, key_digest

KEY = "sk-quill-test-4f1c"


def test_the_expected_digest_comes_from_the_digest_or_the_key():
    assert expected_key_digest({"QUILL_API_KEY_SHA256": key_digest(KEY).upper()}) == key_digest(KEY)
    assert expected_key_digest({"QUILL_API_KEY": KEY}) == key_digest(KEY)
    assert expected_key_digest({}) is None and expected_key_digest({"QUILL_API_KEY": ""}) is None


@pytest.fixture
def client():
    app = FastAPI()
    app.add_middleware(EdgeGuard, settings={"api_key_sha256": key_digest(KEY), "max_body_bytes": 10_000})

    @app.get("/v1/models")
    def models():
        return {"data": []}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize(
    "header",
    [None, f"Bearer {KEY}x", f"Basic {KEY}", f"bearer {KEY}", KEY, "Bearer ", f"Bearer {key_digest(KEY)}"],
    ids=["none", "wrong", "basic", "lowercase", "bare", "empty", "the-digest"],
)
def test_anything_but_the_bearer_key_gets_an_openai_401(client, header):
    r = client.get("/v1/models", headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text


def test_the_bearer_key_passes_and_health_is_open(client):
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/health").status_code == 200
