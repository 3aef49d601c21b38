"""Fixtures the unit tests of several folders share: the evaluate stage's tiny project (tests/helpers/projects.py),
which model/test_scoring.py and the tests under pipelines/ score."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.projects import make_project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("evalproj"))
