"""The engine client (pipelines/serve/engine_client.py), without Ray or HTTP: a real engine process with a tiny
model behind it. It gives the engine process the replica's CPUs as torch threads, returns what the offline engine
returns, seeds n samples in turn, refuses past serve.max_ongoing_requests and frees a place when a caller leaves,
passes on the scheduler's refusals, and after an engine failure delivers the tokens made before it, then fails."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from model import Engine, SamplingParams
from pipelines.common.params import ServeParams
from pipelines.serve.engine_client import Busy, EngineClient, Refused, engine_spec, torch_threads
from pipelines.serve.engine_process import EngineFailure, EngineStopped
from tests.helpers.serving import tiny_model_folder

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)  # runs until it is cancelled
SETTINGS = ServeParams(max_batch_size=4, max_ongoing_requests=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("engine_client"), seed=0)


@pytest.fixture(scope="module")
def run():
    """Runs a coroutine on the module's one event loop (the client hands the engine's messages to the loop its
    requests came from), failing after 60 s."""
    loop = asyncio.new_event_loop()
    yield lambda coro: loop.run_until_complete(asyncio.wait_for(coro, 60))
    loop.close()


@pytest.fixture(scope="module")
def engine(folder, run):
    client = EngineClient(engine_spec(folder, SETTINGS), SETTINGS.max_ongoing_requests)
    yield client
    client.close()


def held(client: EngineClient) -> int:
    return client.stats()["running"] + client.stats()["waiting"]


async def idle(client: EngineClient) -> None:
    """Until the engine reports no rows, running or waiting."""
    while held(client):
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(("num_cpus", "threads"), [(0.25, 1), (1, 1), (1.5, 1), (2, 2), (3.9, 3), (8, 8)])
def test_torch_threads_are_the_replicas_whole_cpus_and_at_least_one(num_cpus, threads):
    assert torch_threads(num_cpus) == threads
    assert engine_spec("m", ServeParams(num_cpus_per_replica=num_cpus)).threads == threads


def test_the_engine_spec_carries_serve_settings():
    spec = engine_spec("m", ServeParams(max_batch_size=3, dtype="bfloat16", compile=True), "ab" * 32, static=True)
    assert (spec.folder, spec.max_batch_size, spec.dtype, spec.compile, spec.static) == ("m", 3, "bfloat16", True, True)
    assert spec.tokenizer_sha256 == "ab" * 32 and spec.device is None
    assert engine_spec("m", ServeParams(num_gpus_per_replica=1)).device == "cuda"


def test_two_cpus_per_replica_give_the_engine_process_two_torch_threads(folder, engine, monkeypatch):
    assert engine.stats()["torch_threads"] == torch_threads(ServeParams().num_cpus_per_replica)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the engine inherits counts for nothing: it sets its own
    two = EngineClient(engine_spec(folder, ServeParams(num_cpus_per_replica=2)), 4)
    try:
        assert two.stats()["torch_threads"] == 2
    finally:
        two.close()


def test_completions_equal_the_offline_engine_and_n_samples_are_seeded_in_turn(folder, engine, run):
    prompts = [[5, 6, 7], [8, 9]]
    before = engine.generated
    done = run(engine.completions(run(engine.submit(prompts, GREEDY))))
    offline = Engine.from_pretrained(folder)
    assert [c.token_ids for c in done] == [c.token_ids for c in offline.generate(prompts, GREEDY)]
    assert engine.generated - before == 16  # the counter /stats reports

    sampled = replace(GREEDY, temperature=1.0, seed=7)
    pair = run(engine.completions(run(engine.submit([[5, 6]], sampled, n=2))))
    second = run(engine.completions(run(engine.submit([[5, 6]], replace(sampled, seed=8)))))
    assert pair[1].token_ids == second[0].token_ids  # choice j of n runs with seed + j


def test_past_its_bound_the_client_is_busy_and_a_caller_who_leaves_frees_its_place(engine, run):
    async def scenario():
        request = await engine.submit([[5, 6]], LONG, n=3)  # 3 of the 4 sequences the client takes
        with pytest.raises(Busy, match="holds 3 sequences and takes at most 4"):
            await engine.submit([[5], [6]], GREEDY)
        updates = engine.updates(request)
        assert {i for i, _ in await anext(updates)} == {0, 1, 2}  # each choice's first token, by choice index
        cancelled = engine.cancelled
        await updates.aclose()  # the caller went away: its sequences are cancelled in the scheduler
        assert engine.cancelled == cancelled + 3
        await idle(engine)
        return await engine.completions(await engine.submit([[5], [6]], GREEDY))

    assert [len(c.token_ids) for c in run(scenario())] == [8, 8]


def test_a_request_the_scheduler_refuses_names_the_parameter_and_holds_nothing(engine, run):
    with pytest.raises(Refused, match="max_tokens") as err:
        run(engine.submit([[5], [5] * 1000], replace(GREEDY, max_tokens=100)))
    assert "context" in str(err.value)
    assert not engine._pending and not engine._queues  # nothing of it left in the books
    assert len(run(engine.completions(run(engine.submit([[5]], GREEDY))))[0].token_ids) == 8


class Unchecked(SamplingParams):
    """Sampling parameters that skip validation, also in the copies the client makes (n samples, seeds)."""

    def __post_init__(self):
        pass


def test_a_failed_step_fails_its_request_and_the_engine_serves_on(engine, run):
    fields = {**vars(GREEDY), "temperature": 1.0, "logit_bias": {5: float("nan")}}  # a step that raises
    poisoned = Unchecked(**fields)
    with pytest.raises(EngineFailure, match="generation failed: RuntimeError") as err:
        run(engine.completions(run(engine.submit([[5, 6]], poisoned))))
    assert not isinstance(err.value, EngineStopped) and engine.alive()
    assert len(run(engine.completions(run(engine.submit([[5]], GREEDY))))[0].token_ids) == 8


def test_a_killed_engine_fails_its_request_after_the_tokens_made_before_and_refuses_new_ones(folder, run):
    client = EngineClient(engine_spec(folder, SETTINGS), SETTINGS.max_ongoing_requests)

    async def scenario():
        updates = client.updates(await client.submit([[5, 6]], LONG))
        received = len(await anext(updates))
        client.process.process.kill()
        with pytest.raises(EngineFailure, match="generation failed: the engine process stopped"):
            async for batch in updates:
                received += len(batch)
        assert received >= 1 and client.cancelled == 0  # failed by the engine, not cancelled by a caller
        with pytest.raises(EngineStopped, match="the replica restarts"):
            await client.submit([[5]], GREEDY)

    try:
        run(scenario())
        assert not client.alive()
    finally:
        client.close()
