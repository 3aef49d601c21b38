"""Bounds at the edge: what a request may hold, and what an error may quote back of it."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipelines.serve.edge import install_error_handlers
from pipelines.serve.schemas import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, CompletionRequest, short


@pytest.fixture(scope="module")
def client() -> TestClient:
    api = FastAPI()
    install_error_handlers(api)

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest) -> dict:
        return {"ok": True}

    return TestClient(api)


@pytest.mark.parametrize(
    ("field", "at_bound", "past_bound"),
    [
        ("logit_bias", {str(i): 1.0 for i in range(MAX_LOGIT_BIAS)}, {str(i): 1.0 for i in range(MAX_LOGIT_BIAS + 1)}),
        ("stop_token_ids", list(range(MAX_STOP_TOKEN_IDS)), list(range(MAX_STOP_TOKEN_IDS + 1))),
    ],
)
def test_lists_and_maps_are_bounded(client: TestClient, field: str, at_bound, past_bound):
    assert client.post("/v1/completions", json={"prompt": "hi", field: at_bound}).status_code == 200
    refused = client.post("/v1/completions", json={"prompt": "hi", field: past_bound})
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == field and error["type"] == "invalid_request_error"
    assert len(error["message"]) < 300


def test_errors_quote_a_short_escaped_prefix_of_the_input(client: TestClient):
    key = "9" * 10_000 + "\n<script>"
    refused = client.post("/v1/completions", json={"prompt": "hi", "logit_bias": {key: 1e9}})
    message = refused.json()["error"]["message"]
    assert refused.status_code == 400 and len(message) < 400 and "\n" not in message and "<script>" not in message
    assert short("x" * 1000) == '"' + "x" * 76 + "..." and short("ok") == '"ok"'
