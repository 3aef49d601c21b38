"""The serving application over real HTTP: the session's Ray Serve (on loopback, high-throughput mode) with a tiny
model and a tiny chat model registered in a temporary MLflow store (served as models:/tiny@champion and
models:/tiny-chat@champion; the chat model is a third-party Llama folder fine-tuned by the finetune stage, its
tokenizer given the ChatML markers it lacked), the official openai client, the validation matrix, its OpenAPI document under
schemathesis, auth, back-pressure, disconnects, continuous batching, which model answers which request, a rolling
update under load, and a promotion that rolls only the promoted model's replicas."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import psutil
import pytest
import schemathesis
from mlflow import MlflowClient
from ray import serve
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from tokenizers import Tokenizer

from model import Engine, SamplingParams, Scheduler
from pipelines.serve import AppArgs, app
from pipelines.serve.server import api
from tests.helpers.chat import fine_tuned_llama
from tests.helpers.services import copy_store, wait_for
from tests.helpers.serving import (
    CHAT_NAME,
    NAME,
    delete_apps,
    listener,
    register,
    tiny_model_folder,
    write_params,
)

pytestmark = pytest.mark.integration


APPS = ("quill", "auth", "tight")


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_template, shared_ray):
    """Three apps on the session's Ray Serve: `quill` at / (models:/tiny@champion, and models:/tiny-chat@champion
    beside it), `auth` at /auth (QUILL_API_KEY set, serve.stream_interval 4, serve.dtype bfloat16), `tight` at
    /tight (a model without a chat template; one sequence at a time, at most two held, three HTTP requests in
    flight: the back-pressure). `auth` and `tight` serve a folder and find no registry: each its model alone.
    Deleted when the module is done."""
    root = tmp_path_factory.mktemp("serve")
    tracking = copy_store(mlflow_template, root)
    v1 = tiny_model_folder(root / "v1", seed=0)
    v2 = tiny_model_folder(root / "v2", seed=1)
    # the chat champion: a third-party Llama folder without ChatML markers, fine-tuned by the finetune stage
    chat = [fine_tuned_llama(root / "chat1", max_position_embeddings=1024)]
    chat.append(tiny_model_folder(root / "chat2", seed=3, name=CHAT_NAME))
    plain = tiny_model_folder(root / "plain", seed=4, name="plain", chat=False)
    register(v1, tracking)
    register(chat[0], tracking, CHAT_NAME)
    nowhere = f"sqlite:///{root / 'no-registry.db'}"  # no store: no chat model's champion to serve
    try:
        params = write_params(root / "params.yaml", max_batch_size=8, default_max_tokens=16, max_tokens_cap=1000)
        serve.run(app(AppArgs(params_file=str(params), tracking_uri=tracking)), name="quill", route_prefix="/")
        grouped = write_params(
            root / "auth.yaml", max_batch_size=8, default_max_tokens=16, stream_interval=4, dtype="bfloat16"
        )
        os.environ["QUILL_API_KEY"] = "sekret"
        try:
            auth = AppArgs(model=str(v1), params_file=str(grouped), tracking_uri=nowhere)
            serve.run(app(auth), name="auth", route_prefix="/auth")
        finally:
            del os.environ["QUILL_API_KEY"]
        tight = write_params(root / "tight.yaml", max_batch_size=1, max_ongoing_requests=2, max_queued_requests=1)
        tight = AppArgs(model=str(plain), params_file=str(tight), tracking_uri=nowhere)
        serve.run(app(tight), name="tight", route_prefix="/tight")
        # serve.run returns once the replicas run; HAProxy takes up a new route a moment later
        for prefix in ("", "/auth", "/tight"):
            url = f"{shared_ray['url']}{prefix}/health"
            wait_for(lambda url=url: httpx.get(url).status_code == 200, 60, f"{url} routed")
        yield {"url": shared_ray["url"], "tracking": tracking, "params": params, "v1": v1, "v2": v2, "chat": chat}
    finally:
        delete_apps(*APPS)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server["url"], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine(server):
    return Engine.from_pretrained(server["v1"])


def healthy(http) -> bool:
    return http.get("/health").status_code == 200 and http.get("/v1/models").status_code == 200


def test_high_throughput_mode_puts_haproxy_on_the_port_and_replicas_on_loopback(server):
    port = int(server["url"].rsplit(":", 1)[1])
    assert listener(port) == "haproxy"  # not Ray's Python proxy actor
    # each replica answers HTTP itself, for HAProxy, on loopback like the port (serve.host)
    replicas = [
        c.laddr for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and 30000 <= c.laddr.port <= 31000 and c.pid
        and psutil.Process(c.pid).name().startswith("ray::ServeReplica")
    ]  # fmt: skip
    assert len(replicas) >= len(APPS) and all(addr.ip == "127.0.0.1" for addr in replicas), replicas


# -- the openai client -----------------------------------------------------------------------------


def test_models_lists_both_champions_by_their_registry_versions(client, server):
    base, chat = client.models.list().data
    assert base.id == NAME and base.model_extra["version"] == "1" and base.model_extra["uri"] == "models:/tiny/1"
    champion = MlflowClient(server["tracking"], server["tracking"]).get_model_version_by_alias(CHAT_NAME, "champion")
    assert chat.id == CHAT_NAME and chat.model_extra["uri"] == f"models:/{CHAT_NAME}/{champion.version}"


def test_greedy_completion_equals_the_offline_engine(client, engine):
    r = client.completions.create(
        model=NAME, prompt="To be, or", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    [ref] = engine.generate(["To be, or"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert r.choices[0].text == ref.text
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == len(engine.encode("To be, or"))


def test_serve_dtype_holds_the_weights_in_bfloat16(http, server):
    auth = {"Authorization": "Bearer sekret"}
    assert http.get("/stats").json()["dtype"] == "float32"  # auto: as saved
    assert http.get("/auth/stats", headers=auth).json()["dtype"] == "bfloat16"
    body = {"prompt": "To be, or", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    r = http.post("/auth/v1/completions", json=body, headers=auth)
    # the replica's code path offline (bfloat16 rounds differently where a step masks and where it does not)
    scheduler = Scheduler(Engine.from_pretrained(server["v1"], dtype="bfloat16"), max_batch_size=8)
    scheduler.add("To be, or", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    done = []
    while scheduler.has_work():
        done += [u.completion for u in scheduler.step() if u.completion is not None]
    [ref] = done
    assert r.json()["choices"][0]["text"] == ref.text


def test_n_seed_and_logprobs(client):
    kw = dict(model=NAME, prompt=["To be", "All the"], max_tokens=8, temperature=1.0, seed=42, n=2, logprobs=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert len(a.choices) == 4 and [c.text for c in a.choices] == [c.text for c in b.choices]
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)


def test_echo_with_zero_max_tokens_returns_prompt_logprobs(client, engine):
    ids = engine.encode("To be, or not to be")
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs.token_logprobs
    assert lp[0] is None and len(lp) == len(ids)
    [(ll, _)] = engine.loglikelihood([(ids[:3], ids[3:])])
    assert sum(lp[3:]) == pytest.approx(ll, abs=1e-3)


def chatml_ids(folder, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The ChatML prompt of `messages` with their content as literal text (what the server must feed the model),
    and the same prompt with markers in the content read as special tokens (what it must not)."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    literal = Tokenizer.from_str(tokenizer.to_str())
    literal.encode_special_tokens = True
    start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    prompts = []
    for encoder in (literal, tokenizer):
        ids = []
        for m in messages:
            ids += [start, *encoder.encode(f"{m['role']}\n{m['content']}").ids, end, *literal.encode("\n").ids]
        prompts.append(ids + [start, *literal.encode("assistant\n").ids])
    return prompts[0], prompts[1]


def test_chat_and_streaming(client, server, engine):
    """A user's "<|im_end|>" is text, never the marker that closes their turn: the model gets the literal prompt
    (its length, and the greedy answer to exactly those ids), which the special-token reading would change."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there 🙂"}]
    literal, special = chatml_ids(server["v1"], msgs)
    end = engine.tokenizer.token_to_id("<|im_end|>")
    assert literal.count(end) == 2 and special.count(end) == 3 and len(literal) != len(special)
    r = client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
    )
    assert r.usage.prompt_tokens == len(literal)
    [want] = engine.generate([literal], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[end]))
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.token_ids)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == want.finish_reason
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=msgs, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


# -- two models: which one answers ----------------------------------------------------------------------------


def im_end_bias(folder, bias: float) -> dict[str, float]:
    """logit_bias for the <|im_end|> of the model in `folder` (the two models' tokenizers differ)."""
    end = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|im_end|>")
    return {str(end): bias}


def test_without_a_model_completions_get_the_base_and_chats_the_chat_model(http, server):
    """<|im_end|> made the likeliest token: the chat model's chat stops at it at once, a completion of the same model
    runs on (only a chat ends with the assistant's turn); the base model answers completions and, named, chats."""
    end = im_end_bias(server["chat"][0], 100)
    chat = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8, "logit_bias": end}).json()
    assert chat["model"] == CHAT_NAME and chat["choices"][0]["finish_reason"] == "stop", chat
    assert chat["usage"]["completion_tokens"] == 1 and chat["choices"][0]["message"]["content"] == ""
    body = {"prompt": "To be", "max_tokens": 8, "logit_bias": im_end_bias(server["v1"], 100)}
    assert http.post("/v1/completions", json=body).json()["model"] == NAME
    theirs = http.post("/v1/completions", json={**body, "model": CHAT_NAME, "logit_bias": end}).json()
    assert theirs["model"] == CHAT_NAME and theirs["choices"][0]["finish_reason"] == "length", theirs
    assert theirs["usage"]["completion_tokens"] == 8
    assert http.post("/v1/chat/completions", json={**CHAT, "model": NAME}).json()["model"] == NAME
    # the other routes that name a model reach the chat model's replica too
    assert http.post("/tokenize", json={"prompt": "To be", "model": CHAT_NAME}).json()["count"] > 0
    assert http.get("/health", params={"model": CHAT_NAME}).json()["model"] == CHAT_NAME
    unknown = http.get("/stats", params={"model": "gpt-4"})
    assert unknown.status_code == 404 and f"{NAME!r}, {CHAT_NAME!r}" in unknown.json()["error"]["message"]


def test_the_chat_models_stream_comes_through_the_ingress_whole(client):
    msgs = [{"role": "user", "content": "Who is there? 🙂"}]
    r = client.chat.completions.create(model=CHAT_NAME, messages=msgs, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=CHAT_NAME,
            messages=msgs,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.model for c in chunks} == {CHAT_NAME} and r.model == CHAT_NAME
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_leaving_a_chat_stream_early_frees_its_slot_in_the_chat_models_replica(http, server):
    def chat_stats() -> dict:
        return http.get("/stats", params={"model": CHAT_NAME}).json()

    before = chat_stats()["cancelled"]
    # <|im_end|> banned, so it cannot end before the client leaves
    body = {
        **CHAT,
        "max_tokens": 900,
        "stream": True,
        "ignore_eos": True,
        "logit_bias": im_end_bias(server["chat"][0], -100),
    }
    with (
        httpx.Client(base_url=server["url"], timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content": ""' not in line:  # after the role: a token
                break

    def freed():
        s = chat_stats()
        return s["running"] == 0 and s["cancelled"] == before + 1

    wait_for(freed, 30, "the chat model's replica to cancel the stream its client left", every=0.05)


def test_a_chat_with_a_model_without_a_chat_template_is_refused_naming_it(http):
    assert [m["id"] for m in http.get("/tight/v1/models").json()["data"]] == ["plain"]  # no chat model: alone
    r = http.post("/tight/v1/chat/completions", json=CHAT)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "model" and "'plain' has no chat template" in err["message"], err


def test_stream_never_splits_a_character_and_ends_with_done(http):
    body = {"prompt": "Émoji 🙂 and 中文", "max_tokens": 30, "temperature": 0, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    pieces = [json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1]]
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # a random model may emit stray bytes mid-text
    full = http.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]["text"]
    assert "".join(pieces) == full


def test_streamed_events_carry_every_token_and_its_logprob(http):
    # an event may hold several tokens (the stream sends what queued up since the last one): none is lost
    body = {"prompt": "Émoji 🙂 and", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    full = http.post("/v1/completions", json=body).json()["choices"][0]
    streamed = [e["choices"][0] for e in events]
    assert "".join(c["text"] for c in streamed) == full["text"]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert [x for c in streamed for x in c["logprobs"][key]] == full["logprobs"][key]
    assert streamed[-1]["finish_reason"] == "length"


def test_tokenize_round_trip(http):
    for text in ["", "To be", "Émoji 🙂 and 中文 text; naïve café.", "<|im_start|>user"]:
        ids = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
        back = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
        assert back == text.replace("<|im_start|>", "")  # special tokens are skipped when decoding


def test_the_served_openapi_document_is_the_apps(http):
    served = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/health"} <= set(served["paths"])
    assert served == json.loads(json.dumps(api.openapi()))  # what schemathesis reads below


# schemathesis reads the app's own document, which the server sends as /openapi.json (test above); loaded here, at
# collection, its operations are tests of their own. At most 50 requests per operation and phase, the same ones
# every run (derandomized, no example database).
OPENAPI = schemathesis.openapi.from_dict(json.loads(json.dumps(api.openapi())))
OPENAPI.config.generation.update(max_examples=50, deterministic=True, database="none")
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@OPENAPI.parametrize()
def test_every_answer_to_generated_requests_is_the_documented_one(case, server):
    """schemathesis's requests to `auth` (with its API key), valid and invalid ones, streams among them: each
    answer's status, content type, headers (Retry-After) and body (each event of a stream) are the ones the document
    declares for it, and none is a server error."""
    url, auth = f"{server['url']}/auth", {"Authorization": "Bearer sekret"}
    case.call_and_validate(base_url=url, headers=auth, checks=CONFORMANCE, timeout=60)


# -- validation ------------------------------------------------------------------------------------

P = {"prompt": "To be", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD = [
    ("/v1/completions", b'{"prompt": "To be", ', 400, None),
    ("/v1/completions", '{"prompt": "caf\xe9"}'.encode("latin-1"), 400, None),
    ("/v1/completions", {**P, "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {**P, "bogus": 1}, 400, "bogus"),
    ("/v1/completions", {**P, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {**P, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**P, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**P, "prompt": "To be " * 400, "max_tokens": 900}, 400, "max_tokens"),
    ("/v1/completions", {**P, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {**P, "max_tokens": 1001}, 400, "max_tokens"),
    ("/v1/completions", {**P, "temperature": -0.1}, 400, "temperature"),
    ("/v1/completions", {**P, "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {**P, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**P, "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {**P, "n": 9}, 400, "n"),
    ("/v1/completions", {**P, "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {**P, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {**P, "stop": ["x" * 65]}, 400, "stop"),
    ("/v1/completions", {**P, "n": 2, "stream": True}, 400, "n"),
    ("/v1/completions", {**P, "prompt": [1, 2, 99999]}, 400, "prompt"),
    ("/v1/completions", {**P, "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x" * 1_100_000}, 413, None),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),  # the chat model's
    ("/v1/chat/completions", {**CHAT, "model": f"models:/{CHAT_NAME}/99"}, 404, "model"),  # ... replica refuses
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model"),
    ("/detokenize", {"tokens": [5, 99999]}, 400, "tokens"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_an_openai_error_and_the_server_stays_healthy(http, route, body, status, param):
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert healthy(http)


def test_request_without_max_tokens_gets_the_default(client):
    r = client.completions.create(model=NAME, prompt="To be", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16  # serve.default_max_tokens in this module's params


# -- auth, back-pressure, disconnects --------------------------------------------------------------


def test_auth_required_when_a_key_is_set(http):
    assert http.get("/auth/health").status_code == 200
    r = http.get("/auth/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert http.get("/auth/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = http.post("/auth/v1/completions", json=P, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200
    assert http.get("/v1/models").status_code == 200  # the app without a key stays open


def test_stream_interval_groups_tokens_after_the_first(http):
    body = {"prompt": "To be", "max_tokens": 21, "temperature": 0, "ignore_eos": True, "logprobs": 0, "stream": True}
    auth = {"Authorization": "Bearer sekret"}
    with http.stream("POST", "/auth/v1/completions", json=body, headers=auth) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    sizes = [len(e["choices"][0]["logprobs"]["tokens"]) for e in events]
    # the first event goes out with whatever its batch held (the admitting step gives two tokens, more when the
    # event loop fell behind: tests/unit/pipelines/serve/test_responses.py pins the rule itself); then groups of the interval
    assert sum(sizes) == 21 and all(n >= 4 for n in sizes[1:-1]) and len(sizes) <= 6, sizes


def test_a_burst_is_refused_by_quill_in_openai_shape_with_retry_after(server):
    """32 requests at once on `tight`: some are served, the others refused by quill itself, 429 past its two
    sequences or 503 past its three requests in flight, in OpenAI's shape with Retry-After; never by Ray, whose
    refusal is plain text (its bounds sit above quill's: pipelines/serve/__init__.py, deployment_options)."""

    async def main():
        async with httpx.AsyncClient(base_url=server["url"], timeout=60) as c:
            body = {"prompt": "To be", "max_tokens": 100, "ignore_eos": True}
            return await asyncio.gather(*(c.post("/tight/v1/completions", json=body) for _ in range(32)))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code != 200]
    assert 200 in codes and refused and set(codes) <= {200, 429, 503}, codes
    for r in refused:
        assert r.headers["content-type"] == "application/json" and r.headers["retry-after"] == "1", r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_past_its_requests_in_flight_a_replica_answers_503_not_rays_plain_refusal(server):
    """`tight` holds at most three HTTP requests (serve.max_ongoing_requests 2 + serve.max_queued_requests 1):
    three uploads that never finish fill it, and the next request gets quill's 503 with Retry-After in OpenAI's
    shape. (With Ray's bounds where they were, quill's + 16 requests in a replica and serve.max_queued_requests in
    Ray's queue, such uploads filled Ray's slots and queue, and Ray refused with a plain-text 429.)"""
    port = int(server["url"].rsplit(":", 1)[1])
    head = b"POST /tight/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    body = {"prompt": "To be", "max_tokens": 1}

    def refused():
        r = httpx.post(f"{server['url']}/tight/v1/completions", json=body, timeout=60)
        return r.status_code != 200 and r

    uploads = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        for s in uploads:
            s.sendall(head + b"Content-Length: 64\r\n\r\n{")  # 63 bytes of the body never come
        r = wait_for(refused, 60, "a request refused while three uploads hang", every=0.1)
    finally:
        for s in uploads:
            s.close()
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("server_error", "server_overloaded", None), err
    wait_for(lambda: not refused(), 60, "`tight` serving again once the uploads are gone", every=0.1)


def test_the_replica_refuses_past_its_bound_in_openai_shape(server):
    """`tight` holds at most serve.max_ongoing_requests = 2 sequences: an n=2 request fills it (one running,
    one waiting), and the next request is refused by quill itself: 429, Retry-After, OpenAI's error shape."""

    async def main():
        async with httpx.AsyncClient(base_url=server["url"] + "/tight", timeout=60) as c:
            body = {"prompt": "To be", "max_tokens": 900, "ignore_eos": True}
            deadline = time.monotonic() + 60  # the replica is idle first (earlier rows retire at a step boundary)
            while (s := (await c.get("/stats")).json())["running"] + s["waiting"] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert s["running"] + s["waiting"] == 0, s
            filling = asyncio.create_task(c.post("/v1/completions", json={**body, "n": 2}))
            deadline = time.monotonic() + 60  # generous: a loaded machine is slow to route the request
            while time.monotonic() < deadline and not filling.done():
                s = (await c.get("/stats")).json()
                if s["running"] + s["waiting"] == 2:
                    break
                await asyncio.sleep(0.01)
            if filling.done():
                r = filling.result()
                raise AssertionError(f"the n=2 request ended before it was seen held: {r.status_code} {r.text[:300]}")
            assert s["running"] + s["waiting"] == 2, s  # the n=2 request holds the replica's whole bound
            refused = await c.post("/v1/completions", json=body)
            return refused, await filling

    for _ in range(3):  # on a loaded machine the n=2 request can finish before the next one reaches the replica
        refused, filled = asyncio.run(main())
        assert filled.status_code == 200 and len(filled.json()["choices"]) == 2
        if refused.status_code != 200:
            break
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
    err = refused.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "rate_limit_error" and err["message"]


def stats(http) -> dict:
    return http.get("/stats").json()


def test_client_disconnect_mid_stream_frees_its_slot(http, server):
    before = stats(http)["cancelled"]
    body = {"prompt": "To be", "max_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server["url"], timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first token: the client closes the connection

    def freed():
        s = stats(http)
        return s["running"] == 0 and s["cancelled"] == before + 1

    wait_for(freed, 30, "the disconnected request cancelled and its slot free", every=0.05)


def test_short_request_finishes_while_a_long_one_runs(server):
    """The short request is sent once the long one has streamed its first token (it is decoding): the short one
    joins the running batch and returns while the long one still has hundreds of tokens to go."""

    async def main():
        async with httpx.AsyncClient(base_url=server["url"], timeout=120) as c:
            finished, decoding = [], asyncio.Event()

            async def long():
                body = {"prompt": "To be", "max_tokens": 1000, "ignore_eos": True, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200, await r.aread()
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            decoding.set()
                finished.append("long")

            async def short():
                await decoding.wait()
                r = await c.post("/v1/completions", json={"prompt": "To be", "max_tokens": 4, "ignore_eos": True})
                assert r.status_code == 200, r.text
                finished.append("short")

            await asyncio.wait_for(asyncio.gather(long(), short()), 120)
            return finished

    assert asyncio.run(main()) == ["short", "long"]


# -- rollout ---------------------------------------------------------------------------------------


def replica(http, model: str) -> tuple[int, str]:
    """The engine process serving `model` (a new replica has a new one) and the version it serves."""
    s = http.get("/stats", params={"model": model}).json()
    return s["engine_pid"], s["version"]


def test_rolling_update_under_load_fails_no_request(server, http):
    """`quill`'s base model (at /, as a deployment is) is rolled over to v2, the new champion, while four clients
    keep sending requests: every request succeeds, v2 serves afterwards, and the chat model's replica is the one it
    was. Then it is rolled back to v1 for the other tests."""
    client = MlflowClient(server["tracking"], server["tracking"])
    args = AppArgs(params_file=str(server["params"]), tracking_uri=server["tracking"])
    chat = replica(http, CHAT_NAME)
    version = register(server["v2"], server["tracking"])  # a promotion: champion is now the new version
    results, stop = [], threading.Event()

    def load():
        with httpx.Client(base_url=server["url"], timeout=120) as c:
            while not stop.is_set():
                r = c.post("/v1/completions", json={"prompt": "To be", "max_tokens": 12})
                results.append(r.status_code if r.status_code == 200 else (r.status_code, r.text[:200]))

    workers = [threading.Thread(target=load) for _ in range(4)]
    try:
        for w in workers:
            w.start()
        wait_for(lambda: len(results) >= 8, 60, "eight requests answered before the update", every=0.05)
        serve.run(app(args), name="quill", route_prefix="/")  # the same URI (@champion), now the new version
        answered = len(results)
        wait_for(lambda: len(results) >= answered + 8, 60, "eight requests answered after it", every=0.05)
        stop.set()
        for w in workers:
            w.join()
        assert set(results) == {200}, [r for r in results if r != 200]
        assert http.get("/v1/models").json()["data"][0]["version"] == version
    finally:
        stop.set()
        for w in workers:
            if w.is_alive():
                w.join()
        client.set_registered_model_alias(NAME, "champion", "1")
        serve.run(app(args), name="quill", route_prefix="/")
    assert http.get("/v1/models").json()["data"][0]["version"] == "1"
    assert replica(http, CHAT_NAME) == chat  # two redeploys of the app, neither of them the chat model's


def test_promoting_the_chat_model_rolls_its_replicas_only(server, http):
    """The chat model's champion moves to its other version and the app is deployed again, as after any
    registration: Ray Serve replaces the chat model's replica (a new engine process, serving the new version) and
    leaves the base model's running (the same engine process)."""
    client = MlflowClient(server["tracking"], server["tracking"])
    versions = {v.version for v in client.search_model_versions(f"name='{CHAT_NAME}'")}
    if len(versions) == 1:
        promoted = register(server["chat"][1], server["tracking"], CHAT_NAME)
    else:  # this test ran before in the session
        current = client.get_model_version_by_alias(CHAT_NAME, "champion").version
        promoted = next(v for v in versions if v != current)
        client.set_registered_model_alias(CHAT_NAME, "champion", promoted)
    base, chat = replica(http, NAME), replica(http, CHAT_NAME)
    args = AppArgs(params_file=str(server["params"]), tracking_uri=server["tracking"])
    serve.run(app(args), name="quill", route_prefix="/")
    # serve.run returns once the new replica runs; the ingress's handle learns of it a moment later
    wait_for(lambda: replica(http, CHAT_NAME)[1] == promoted, 60, f"{CHAT_NAME} v{promoted} answering")
    assert replica(http, CHAT_NAME)[0] != chat[0] and replica(http, NAME) == base


# -- a crashed engine ------------------------------------------------------------------------------


def test_a_killed_engine_fails_its_requests_and_ray_replaces_the_replica(http):
    """The engine process of `auth` dies mid-stream: the stream ends with an error event, new requests get 503,
    /health says so, and Ray's health check replaces the replica (a new engine serves again)."""
    auth = {"Authorization": "Bearer sekret"}
    old = http.get("/auth/stats", headers=auth).json()["engine_pid"]
    body = {"prompt": "To be", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/auth/v1/completions", json=body, headers=auth) as r:
        lines = r.iter_lines()
        assert next(ln for ln in lines if ln.startswith("data: {"))
        os.kill(old, signal.SIGKILL)
        rest = [ln for ln in lines if ln.startswith("data: ")]
    assert '"server_error"' in rest[-2] and "engine process stopped" in rest[-2] and rest[-1] == "data: [DONE]"
    refused = http.post("/auth/v1/completions", json={"prompt": "To be", "max_tokens": 2}, headers=auth)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error", refused.text
    assert http.get("/auth/health").status_code == 503

    def replaced():
        s = http.get("/auth/stats", headers=auth)
        return s.status_code == 200 and s.json()["engine_pid"] != old

    wait_for(replaced, 120, "a new replica of `auth` with its own engine")
    body = {"prompt": "To be", "max_tokens": 2, "temperature": 0, "ignore_eos": True}  # the same answer every time
    # HAProxy reloads its routes after the replacement: /auth may answer 404 for a moment first
    ok = wait_for(
        lambda: (r := http.post("/auth/v1/completions", json=body, headers=auth)).status_code == 200 and r,
        60,
        "a completion from the new replica",
    )
    assert ok.json()["choices"][0]["finish_reason"] == "length", ok.text
    assert ok.json()["usage"]["completion_tokens"] == 2
