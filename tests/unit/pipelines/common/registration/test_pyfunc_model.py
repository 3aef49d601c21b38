"""The registered pyfunc model's `predict` has the type hints MLflow looks for: defining it (at import, and when
MLflow loads the file as "models from code") warns about nothing."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.paths import REPO

DEFINE = "import warnings; warnings.simplefilter('always'); import pipelines.common.registration.pyfunc_model"


def test_defining_the_pyfunc_model_gives_no_type_hint_warning():
    result = subprocess.run([sys.executable, "-c", DEFINE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "type hint" not in result.stderr.lower(), result.stderr
