"""register: the pyfunc model round-trips through the registry; champion/challenger rules against a real
tracking store (SQLite, and a real `mlflow server` over HTTP); the registration lock (owner token, heartbeat,
expiry on one clock); concurrent registrations, some SIGKILLed while holding the lock; a rerun after a SIGKILL
at each point inside `register` finishes the same version."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.common.params import RegistryParams
from tests.helpers.paths import REPO
from tests.helpers.projects import make_project
from tests.helpers.services import copy_store, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "quill-test"
PARAMS_YAML = "data:\n  sources: [{type: local, path: x}]\nregistry:\n  model_name: quill-test\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("regproj"))


@pytest.fixture
def proj(built, tmp_path, monkeypatch, mlflow_template) -> Path:
    """A fresh copy of the project as cwd with its own SQLite store."""
    work = tmp_path / "proj"
    for sub in ("data", "artifacts"):
        shutil.copytree(built / sub, work / sub)
    (work / "params.yaml").write_text(PARAMS_YAML)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", copy_store(mlflow_template, work))
    return work


def new_run() -> str:
    from pipelines.common import tracking

    client = tracking.mlflow_client()
    return client.create_run(tracking.get_or_create_experiment(client), run_name="evaluate").info.run_id


def write_eval(
    bpb: float, run_id: str, data_sha: str | None = None, model_sha: str | None = None, stride: int = 32
) -> None:
    """metrics/eval.json as the evaluate stage writes it (the numbers are chosen by the test)."""
    from pipelines.common.hashing import content_hash

    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/eval.json").write_text(
        json.dumps(
            {
                "test_bpb": bpb,
                "test_loss": bpb * 2,
                "test_ppl": 100.0,
                "quill_cloze": {"0shot": {"acc": 0.25}, "5shot": {"acc": 0.5}},
                "reference": {"uniform_bpb": 9.0, "ngram_bpb": 3.0, "ngram_order": 3},
            }
        )
    )
    Path("reports/eval").mkdir(parents=True, exist_ok=True)
    Path("reports/eval/evaluated.json").write_text(
        json.dumps(
            {
                "model_sha256": model_sha or content_hash("artifacts/model/model.safetensors"),
                "test_window_stride": stride,
                "test_data_sha256": data_sha or content_hash("data/clean/test.jsonl"),
                "mlflow_run_id": run_id,
                "tokenizer_sha256": "abc",
            }
        )
    )


def registered() -> dict:
    return json.loads(Path("artifacts/registered.json").read_text())


def champion_version(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def test_promotion_rules_first_worse_better_forced(proj):
    from pipelines.common.tracking import mlflow_client
    from pipelines.register.stage import register

    client = mlflow_client()
    params = RegistryParams(model_name=NAME, min_improvement=0.05)
    run_id = new_run()

    write_eval(3.0, run_id)
    r = register(params)
    assert r["version"] == "1" and r["promoted"] and r["aliases"] == ["champion"] and "first model" in r["why"]
    assert registered() == r and r["run_id"] == run_id and r["model_uri"] == f"models:/{NAME}/1"
    v1 = client.get_model_version(NAME, "1")
    assert v1.tags["promoted"] == "true" and v1.tags["test_bpb"] == "3" and v1.tags["run_id"] == run_id
    assert {"git_commit", "training_run_id", "parameters", "quill_cloze.0shot.acc", "promotion_reason"} <= set(v1.tags)
    assert any(k.startswith("dvc_hash.data/clean") for k in v1.tags)
    assert v1.description.startswith(f"# {NAME} v1") and "## Limitations" in v1.description

    write_eval(2.98, run_id)  # better, but by less than min_improvement
    r = register(params)
    assert r["version"] == "2" and not r["promoted"] and r["aliases"] == ["challenger"]
    assert "< registry.min_improvement" in r["why"] and champion_version(client) == "1"
    assert client.get_model_version(NAME, "2").tags["promoted"] == "false"

    write_eval(2.5, run_id)  # better by 0.5
    r = register(params)
    assert r["promoted"] and r["champion_version"] == "1" and r["champion_test_bpb"] == pytest.approx(3.0)
    assert champion_version(client) == "3" and r["aliases"] == ["champion"]
    assert "same test split" in r["why"]

    write_eval(4.0, run_id)  # much worse, but forced
    r = register(params.model_copy(update={"force_promote": True}))
    assert r["promoted"] and r["forced"] and "forced by registry.force_promote" in r["why"]
    assert champion_version(client) == "4" and client.get_model_version(NAME, "4").tags["forced"] == "true"
    assert len({v.version for v in client.search_model_versions(f"name='{NAME}'")}) == 4


def test_manual_promotion_records_the_verdict_and_keeps_the_champion(proj):
    from pipelines.common.tracking import mlflow_client
    from pipelines.register.stage import register

    client = mlflow_client()
    manual = RegistryParams(model_name=NAME, min_improvement=0.05, promotion="manual")
    run_id = new_run()
    write_eval(3.0, run_id)
    r = register(manual)  # even the first model waits for a reviewer
    assert r["version"] == "1" and not r["promoted"] and r["would_promote"] and r["aliases"] == ["challenger"]
    assert "awaiting a reviewer" in r["why"] and "first model" in r["why"]
    assert client.get_model_version(NAME, "1").tags["promoted"] == "false"

    write_eval(2.5, run_id)
    register(RegistryParams(model_name=NAME, min_improvement=0.05))  # auto: v2 becomes champion
    write_eval(2.0, run_id)  # better by 0.5: the rule says promote, the registry waits
    r = register(manual)
    assert r["version"] == "3" and not r["promoted"] and r["would_promote"] and champion_version(client) == "2"
    assert r["aliases"] == ["challenger"] and "improvement +0.5000" in r["why"]
    write_eval(2.6, run_id)  # worse than the champion: the verdict says so
    r = register(manual)
    assert (
        not r["promoted"] and not r["would_promote"] and "awaiting" not in r["why"] and champion_version(client) == "2"
    )


def test_a_training_run_missing_from_the_store_is_named_not_fatal(proj, capsys):
    """The model was trained against another store: registration goes on, the card leaves out its metrics."""
    from pipelines.common.tracking import mlflow_client
    from pipelines.register.stage import register

    missing = "0" * 32
    Path("artifacts/model/quill_run.json").write_text(json.dumps({"mlflow_run_id": missing}))
    write_eval(3.0, new_run())
    r = register(RegistryParams(model_name=NAME))
    assert r["version"] == "1" and r["promoted"]
    assert f"training run {missing} is not in" in capsys.readouterr().err
    assert mlflow_client().get_model_version(NAME, "1").tags["training_run_id"] == missing


def test_changed_test_split_reevaluates_the_champion(proj):
    from model import Engine
    from pipelines.common.clean_split import read_texts
    from pipelines.common.heldout import held_out
    from pipelines.register.stage import register

    params = RegistryParams(model_name=NAME, min_improvement=0.01)
    run_id = new_run()
    write_eval(1.0, run_id, data_sha="sha256:old-split")  # the champion's recorded figure is on another split
    assert register(params)["promoted"]

    engine = Engine.from_pretrained("artifacts/model")
    texts = read_texts(Path("data/clean/test.jsonl"))
    true_bpb = held_out(
        engine.model,
        [engine.encode(t) for t in texts],
        engine.eos_token_id,
        sum(len(t.encode()) for t in texts),
        32,
        8,
        desc=None,
    )["test_bpb"]
    write_eval(true_bpb - 0.5, run_id)  # on the current split, better than the champion really is there
    r = register(params)
    assert r["promoted"] and "re-evaluated on the current test split" in r["why"]
    assert r["champion_test_bpb"] == pytest.approx(true_bpb, rel=1e-4)  # not the stale 1.0


def test_a_champion_scored_with_another_stride_is_reevaluated_with_this_one(proj):
    """test_bpb depends on eval.stride (a smaller one gives every token more context): a champion's figure at
    stride 32 is not compared with a challenger's at stride 8. Here the champion's recorded figure is far worse than
    it really is at stride 8, and the challenger is worse than the champion really is: scored again at 8, the
    champion stays."""
    from model import Engine
    from pipelines.common.clean_split import read_texts
    from pipelines.common.heldout import held_out
    from pipelines.register.stage import register

    params = RegistryParams(model_name=NAME, min_improvement=0.01)
    run_id = new_run()
    write_eval(9.0, run_id, stride=32)
    assert register(params)["promoted"]

    engine = Engine.from_pretrained("artifacts/model")
    texts = read_texts(Path("data/clean/test.jsonl"))
    docs, n_bytes = [engine.encode(t) for t in texts], sum(len(t.encode()) for t in texts)
    at_8 = held_out(engine.model, docs, engine.eos_token_id, n_bytes, 8, 8, desc=None)["test_bpb"]
    write_eval(at_8 + 0.5, run_id, stride=8)  # "better" than 9.0, worse than the champion at stride 8
    r = register(params)
    assert "window stride 32, now 8" in r["why"] and r["champion_test_bpb"] == pytest.approx(at_8, rel=1e-4)
    assert not r["promoted"], r["why"]


def test_pyfunc_model_round_trips_and_generates(proj):
    import mlflow

    from model import Engine, SamplingParams
    from pipelines.common.registration.pyfunc_model import HF_MODEL_PATH
    from pipelines.register.stage import register

    write_eval(3.0, new_run())
    register(RegistryParams(model_name=NAME))
    uri = f"models:/{NAME}@champion"
    loaded = mlflow.pyfunc.load_model(uri)
    out = loaded.predict({"prompt": ["The king", "And"]}, params={"max_tokens": 6, "temperature": 0.0})
    engine = Engine.from_pretrained("artifacts/model")
    want = engine.generate(["The king", "And"], SamplingParams(max_tokens=6, temperature=0.0))
    assert out["text"].tolist() == [c.text for c in want]
    assert out["completion_tokens"].tolist() == [len(c.token_ids) for c in want]
    assert {p.name for p in loaded.metadata.get_params_schema().params} >= {
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
    }
    folder = Path(mlflow.artifacts.download_artifacts(uri)) / HF_MODEL_PATH  # what a server fetches
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    seeded = [loaded.predict(["The"], params={"max_tokens": 8, "seed": 3})["text"][0] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_stale_or_missing_evaluation_registers_nothing(proj):
    from pipelines.common.tracking import mlflow_client
    from pipelines.register import stage as reg

    code, err = _main(reg)
    assert code == 1 and "metrics/eval.json missing" in err
    write_eval(3.0, new_run(), model_sha="sha256:another-model")
    code, err = _main(reg)
    assert code == 1 and "describes another model" in err
    assert mlflow_client().search_registered_models() == []
    assert not Path("artifacts/registered.json").exists()


def _main(module) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = module.main([])
    return code, err.getvalue()


# --- crashes: a rerun after SIGKILL anywhere in `register` finishes the registration -----------------------------

LOCK_S = 2.0  # registry.lock_timeout_s in these tests: a killed holder's lock is taken over after 2 s of silence

# `python -m pipelines.register`, SIGKILLed when it reaches the named point (registration/versions.py's `reached`)
KILL_AT = """
import os, signal, sys
from pipelines.common.registration import versions
from pipelines.register import stage
def reached(point):
    if point == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
versions.reached = reached
sys.exit(stage.main([]))
"""


def register_child(cwd: Path, kill_at: str | None = None) -> subprocess.Popen:
    """`python -m pipelines.register` in `cwd` (killed at `kill_at`), against this test's MLFLOW_TRACKING_URI."""
    args = ["-c", KILL_AT, kill_at] if kill_at else ["-m", "pipelines.register"]
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def registry_params_yaml(min_improvement: float, lock_s: float = LOCK_S) -> str:
    return PARAMS_YAML + f"  min_improvement: {min_improvement}\n  lock_timeout_s: {lock_s}\n"


def test_crash_points_are_reached_in_order(proj, monkeypatch):
    from pipelines.common.registration import versions
    from pipelines.register import stage

    seen = []
    monkeypatch.setattr(versions, "reached", seen.append)
    write_eval(3.0, new_run())
    stage.register(RegistryParams(model_name=NAME))
    assert tuple(seen) == versions.CRASH_POINTS  # the crash test below covers every point there is


def test_registering_the_same_evaluated_model_again_finds_its_version(proj):
    """Same model bytes, training run and evaluation: the rerun returns the version it registered."""
    from pipelines.common.tracking import mlflow_client
    from pipelines.register.stage import register

    params = RegistryParams(model_name=NAME)
    write_eval(3.0, new_run())
    first = register(params)
    assert register(params) == first and first["version"] == "1"
    versions = mlflow_client().search_model_versions(f"name='{NAME}'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].tags["registration_key"].startswith("sha256:")


@pytest.mark.parametrize(
    "point, bpb",
    [
        ("logged", 2.5),
        ("registered", 2.5),
        ("decided", 2.5),
        ("champion-set", 2.5),
        ("aliases-set", 2.99),
        ("tagged", 2.5),
        ("carded", 2.5),
    ],
)
def test_rerun_after_sigkill_finishes_the_same_version(proj, point, bpb):
    """v1 is champion; v2's registration is SIGKILLed at `point`; the rerun finishes v2, no duplicate."""
    from pipelines.common.hashing import content_hash
    from pipelines.common.tracking import mlflow_client
    from pipelines.register.stage import register

    client = mlflow_client()
    params = RegistryParams(model_name=NAME, min_improvement=0.05, lock_timeout_s=LOCK_S)
    (proj / "params.yaml").write_text(registry_params_yaml(0.05))
    run_id = new_run()
    write_eval(3.0, run_id)
    register(params)
    write_eval(bpb, run_id)  # promoted at 2.5, not at 2.99

    child = register_child(proj, kill_at=point)
    out = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, out
    first = register(params)  # the rerun (it waits out the killed holder's lock where it held one)
    assert register(params) == first  # and a third run finds everything done

    promoted = bpb == 2.5
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{NAME}'")) == ["1", "2"]
    assert first["version"] == "2" and first["promoted"] == promoted and registered() == first
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["promoted"] == str(promoted).lower() and v2.tags["promotion_reason"] == first["why"]
    assert v2.tags["model_sha256"] == content_hash("artifacts/model/model.safetensors")
    assert v2.description.startswith(f"# {NAME} v2") and ("Promoted to champion" in v2.description) == promoted
    assert v2.aliases == (["champion"] if promoted else ["challenger"]) and first["aliases"] == v2.aliases
    assert champion_version(client) == ("2" if promoted else "1")
    assert [m.name for m in client.search_registered_models()] == [NAME]  # the killed holder's lock is gone


# --- the registration lock ------------------------------------------------------------------------------------


def heartbeat(client) -> int:
    """The lock's heartbeat counter, from the description its holder rewrites at each renewal."""
    description = client.get_registered_model(f"{NAME}.registration-lock").description
    return int(description.split("(heartbeat ")[1].split(")")[0])


def test_lock_is_renewed_owned_and_expires_on_one_clock(proj, monkeypatch):
    """A live holder is never taken over, even by a waiter whose wall clock runs an hour ahead; once it stops
    renewing it is, and the old holder can neither write (ensure) nor release the new holder's lock.

    The waiter's monotonic clock is the test's: it advances by what the waiter sleeps, and the holder renews
    once per timeout_s / 4 of it (as its heartbeat thread does), so no real clock decides the outcome."""
    from pipelines.common.registration import lock
    from pipelines.common.tracking import mlflow_client

    client = mlflow_client()
    a = lock.RegistrationLock(client, NAME, timeout_s=LOCK_S).__enter__()
    wait_for(lambda: heartbeat(client) >= 2, 60, "the holder's heartbeat thread renewing the lock", every=0.1)
    a._stop.set()  # from here the test renews for A, on the waiter's clock
    a._beat.join()

    clock = {"now": 0.0, "slept": 0.0, "renewing": True, "beat": heartbeat(client)}

    def sleep(seconds: float) -> None:
        clock["now"] += seconds
        clock["slept"] += seconds
        if clock["renewing"] and clock["slept"] >= LOCK_S / 4:  # A's beat: every timeout_s / 4
            clock["slept"], clock["beat"] = 0.0, clock["beat"] + 1
            client.update_registered_model(a.name, description=a._describe(clock["beat"]))
        if clock["now"] >= 10 * LOCK_S:  # A stalls (frozen, or killed): its heartbeat stops
            clock["renewing"] = False

    skewed = SimpleNamespace(time=lambda: time.time() + 3600, monotonic=lambda: clock["now"], sleep=sleep)
    monkeypatch.setattr(lock, "time", skewed)  # the waiter's wall clock is an hour ahead of the store's
    b = lock.RegistrationLock(client, NAME, timeout_s=LOCK_S).__enter__()
    # B waited through ten timeouts' worth of renewals, and took over within about one timeout of the silence
    assert 10 * LOCK_S + LOCK_S <= clock["now"] <= 10 * LOCK_S + 2 * LOCK_S, clock
    with pytest.raises(lock.LockLost):
        a.ensure()  # A must not write what it decided
    a.__exit__(None, None, None)  # A's release leaves B's lock alone
    b.ensure()
    assert client.get_registered_model(b.name).tags["owner"] == b.token != a.token
    b.__exit__(None, None, None)
    assert [m.name for m in client.search_registered_models()] == []


HOLD_LOCK = """
import sys, time
from pipelines.common.tracking import mlflow_client
from pipelines.common.registration.lock import RegistrationLock
RegistrationLock(mlflow_client(), sys.argv[1], timeout_s=600).__enter__()
print("held", flush=True)
time.sleep(600)
"""


def test_a_lock_whose_holder_exited_on_this_machine_is_taken_over_at_once(proj, capsys, monkeypatch):
    """A registration SIGKILLed while holding the lock (renewal every 150 s, expiry after 600 s) holds up the
    next one on the same machine for no longer than it takes to see that the process is gone."""
    from pipelines.common.registration import lock as lock_module
    from pipelines.common.registration.lock import RegistrationLock
    from pipelines.common.tracking import mlflow_client

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, NAME],
        cwd=proj,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait()
    client = mlflow_client()
    left = client.get_registered_model(f"{NAME}.registration-lock").tags
    assert left["pid"] == str(holder.pid) and left["host"] == socket.gethostname()

    slept = []
    monkeypatch.setattr(
        lock_module, "time", SimpleNamespace(time=time.time, monotonic=time.monotonic, sleep=slept.append)
    )
    lock = RegistrationLock(client, NAME, timeout_s=600).__enter__()
    try:
        assert slept == []  # taken over at its first look, without waiting a single poll
        lock.ensure()
    finally:
        lock.__exit__(None, None, None)
    assert "its holder ran on this machine and has exited" in capsys.readouterr().err


# --- a real tracking server over HTTP --------------------------------------------------------------

# Over HTTP, on a loaded machine, one heartbeat (every timeout / 4) can take seconds: a 2 s lock would be taken from
# a live holder (which then stops with LockLost, as it must). 10 s holds it; killed holders cost 10 s each.
HTTP_LOCK_S = 10.0


def test_http_server_concurrent_registrations_some_killed_holding_the_lock(proj, mlflow_http, monkeypatch, capsys):
    """Four checkouts register at once over HTTP with the team stack's server (basic auth, as its admin); two are
    SIGKILLed while they hold the lock and are rerun. Every version is there once, and the champion is the best
    model (each beats the next by > min_improvement, so any order of decisions ends with it)."""
    import mlflow

    from pipelines.common.tracking import mlflow_client
    from pipelines.register.stage import register

    mlflow_server = mlflow_http["uri"]
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, mlflow_http[key])
    run_id = new_run()
    bpbs, kill_at = [3.0, 2.9, 2.8, 2.7], [None, "registered", None, "decided"]
    copies = []
    for i, bpb in enumerate(bpbs):
        write_eval(bpb, run_id)
        other = proj.parent / f"copy{i}"
        for sub in ("artifacts", "metrics", "reports"):
            shutil.copytree(proj / sub, other / sub)
        (other / "params.yaml").write_text(registry_params_yaml(0.05, HTTP_LOCK_S))
        copies.append(other)
    procs = [register_child(c, kill_at=k) for c, k in zip(copies, kill_at)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [-signal.SIGKILL if k else 0 for k in kill_at], [
        (c, err[-1500:]) for c, (_, err) in zip(codes, outs)
    ]
    for c, k in zip(copies, kill_at):
        if k:  # rerun the killed ones
            monkeypatch.chdir(c)
            register(RegistryParams(model_name=NAME, min_improvement=0.05, lock_timeout_s=HTTP_LOCK_S))

    logs = "".join(err for _, err in outs) + capsys.readouterr().err
    assert logs.count("taking over") >= 2  # each killed holder's lock was taken over (none released it)
    results = [json.loads((c / "artifacts/registered.json").read_text()) for c in copies]
    client = mlflow_client(mlflow_server)
    versions = client.search_model_versions(f"name='{NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]  # none lost, none twice
    assert sorted(int(r["version"]) for r in results) == [1, 2, 3, 4]
    best = results[bpbs.index(min(bpbs))]["version"]
    full = [client.get_model_version(NAME, str(v.version)) for v in versions]
    assert [str(v.version) for v in full if "champion" in v.aliases] == [best] == [champion_version(client)]
    assert all(v.tags.get("promoted") in ("true", "false") and v.description.startswith(f"# {NAME} v") for v in full)
    assert [m.name for m in client.search_registered_models()] == [NAME]  # no lock left behind

    mlflow.set_tracking_uri(mlflow_server)
    out = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(["The"], params={"max_tokens": 4})
    assert len(out) == 1 and out["finish_reason"][0] in ("length", "stop")


def test_register_refuses_unreachable_server(proj, monkeypatch):
    from pipelines.register import stage as reg

    write_eval(3.0, "no-run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    code, err = _main(reg)
    assert code == 1 and "unreachable" in err and not Path("artifacts/registered.json").exists()
