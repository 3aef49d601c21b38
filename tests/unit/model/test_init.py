"""The model package (model/__init__.py): importing it loads none of the frameworks."""

import subprocess
import sys


def test_model_import_is_light():
    code = "import sys, model; print(sorted(m for m in ('matplotlib', 'lightning', 'mlflow', 'ray', 'prefect', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
