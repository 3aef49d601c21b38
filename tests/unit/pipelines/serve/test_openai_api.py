"""OpenAI's API over the engine (pipelines/serve/openai_api.py), without an engine or HTTP: prompts in every form
OpenAI accepts, ChatML with literal content, sampling parameters within the context, response bodies and stream
chunks from completions. The engine client's exceptions as OpenAI's errors and stream events: test_responses.py."""

from __future__ import annotations

import asyncio

import pytest

from model import Engine
from model.scheduler import RowUpdate
from model.sequence import Completion, StreamChunk
from pipelines.common.params import ServeParams
from pipelines.serve.openai_api import Translator
from pipelines.serve.schemas import APIError, ChatRequest, CompletionRequest
from pipelines.serve.source import resolve
from tests.helpers.serving import tiny_model_folder

LIMITS = ServeParams(default_max_tokens=16, max_tokens_cap=1000)


@pytest.fixture(scope="module")
def openai(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("openai_api"), seed=0)
    engine = Engine.from_pretrained(folder)
    info = (engine.config.block_size, engine.config.vocab_size, engine.eos_token_id)
    return Translator(folder, info, resolve(str(folder), "sqlite:///unused.db"), LIMITS)


def refused(call, *args) -> APIError:
    with pytest.raises(APIError) as err:
        call(*args)
    return err.value


@pytest.mark.parametrize(
    "prompt", ["To be", ["To be", "All the"], [5, 6, 7], [[5], [6, 7]], "Émoji 🙂 and 中文"], ids=str
)
def test_every_prompt_form_becomes_token_ids_per_prompt(openai, prompt):
    prompts = openai.prompts(prompt)
    texts = [prompt] if isinstance(prompt, str) else prompt
    if texts and isinstance(texts[0], int):
        texts = [texts]
    assert len(prompts) == len(texts)
    for ids, text in zip(prompts, texts):
        assert ids == (openai.tokenizer.encode(text).ids if isinstance(text, str) else text)


@pytest.mark.parametrize("prompt", ["", [], [[]], [5, 99999]], ids=str)
def test_an_empty_prompt_or_an_unknown_token_is_a_400_naming_the_prompt(openai, prompt):
    err = refused(openai.prompts, prompt)
    assert (err.status, err.param) == (400, "prompt")


def test_chat_content_is_literal_text_and_ends_the_answer_at_the_end_marker(openai):
    req = ChatRequest(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}],
        max_tokens=4,
        max_completion_tokens=6,
    )
    prompt, params = openai.chat_input(req)
    assert prompt.count(openai.im_end) == 2 and prompt.count(openai.im_start) == 3  # the user closed no turn
    assert openai.tokenizer.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert params.stop_token_ids == [openai.im_end] and params.max_tokens == 6  # max_completion_tokens wins


def test_max_tokens_defaults_within_the_context_and_past_it_is_a_400(openai):
    _, params = openai.completion_input(CompletionRequest(prompt="To be"))
    assert params.max_tokens == LIMITS.default_max_tokens
    _, params = openai.completion_input(CompletionRequest(prompt=[5] * (openai.block_size - 3)))
    assert params.max_tokens == 3  # the room the context leaves
    err = refused(openai.completion_input, CompletionRequest(prompt=[5] * 1000, max_tokens=100))
    assert (err.status, err.param) == (400, "max_tokens") and "context" in err.message


def test_what_sampling_refuses_is_a_400_naming_the_parameter(openai):
    # check_caps (not called here) caps logprobs at 20 first; SamplingParams refuses past it too
    err = refused(openai.completion_input, CompletionRequest(prompt="To be", logprobs=25))
    assert (err.status, err.param) == (400, "logprobs")
    _, params = openai.completion_input(CompletionRequest(prompt="To be", logit_bias={"7": 5}, echo=True))
    assert params.logit_bias == {7: 5} and not params.echo  # echo scores the prompt only when logprobs are asked


def test_another_models_name_is_a_404_and_the_caps_are_400s(openai):
    err = refused(openai.check, CompletionRequest(prompt="x", model="gpt-4"))
    assert (err.status, err.param, err.code) == (404, "model", "model_not_found")
    openai.check(CompletionRequest(prompt="x", model=openai.source.name))
    err = refused(openai.check, CompletionRequest(prompt="x", max_tokens=1001))
    assert (err.status, err.param) == (400, "max_tokens")


def completion(prompt: list[int], ids: list[int], text: str) -> Completion:
    return Completion(index=0, text=text, token_ids=ids, finish_reason="length", prompt_token_ids=prompt)


def test_a_completion_body_echoes_the_prompt_and_counts_usage(openai):
    req = CompletionRequest(prompt="To be", echo=True, n=2)
    prompts, _ = openai.completion_input(req)
    body = openai.completion_body(
        req, prompts, [completion(prompts[0], [5, 6], "ab"), completion(prompts[0], [7], "c")]
    )
    assert [c["text"] for c in body["choices"]] == ["To beab", "To bec"]
    assert body["object"] == "text_completion" and body["model"] == openai.source.name
    assert body["usage"] == {
        "prompt_tokens": len(prompts[0]),
        "completion_tokens": 3,
        "total_tokens": len(prompts[0]) + 3,
    }


async def batches(updates: list[list[tuple[int, RowUpdate]]]):
    for batch in updates:
        yield batch


def test_completion_chunks_echo_then_stream_then_report_usage(openai):
    req = CompletionRequest(prompt="To be", echo=True, stream=True, stream_options={"include_usage": True})
    prompts, _ = openai.completion_input(req)
    done = completion(prompts[0], [5, 6], "ab")
    steps = [[(0, RowUpdate(0, StreamChunk(5, "a")))], [(0, RowUpdate(0, StreamChunk(6, "b", "length"), done))]]

    async def collect():
        return [e async for e in openai.completion_chunks(req, prompts, batches(steps))]

    events = asyncio.run(collect())
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["To be", "a", "b"]
    assert events[-2]["choices"][0]["finish_reason"] == "length" and len({e["id"] for e in events}) == 1
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2


def test_an_unknown_model_name_is_quoted_short(openai):
    with pytest.raises(APIError) as refused:
        openai.check_model("m" * 100_000)
    assert refused.value.status == 404 and len(refused.value.message) < 200
