"""The layout is a contract: a stage's dvc.yaml deps cover every quill module it loads, stages never import each
other, model/ is pure PyTorch, and quill's modules (model/, pipelines/, flows/) import each other without cycles,
type-only imports included."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.paths import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PACKAGES = ("model", "pipelines")
# pipelines/common/params.py reads model/config.py's presets to reject a bad `model` section in every stage, before
# any work; the data stages' outputs never depend on it, so a preset change must not rerun them.
PARAMS_VALIDATION_ONLY = {"model/config.py"}

LOADED = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
root = sys.argv[2]
print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values())
                         if getattr(m, "__file__", None) and m.__file__.startswith(root)})))
"""


def loaded_files(module: str) -> list[str]:
    """The repository files (relative) that importing `module` loads, in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", LOADED, module, str(REPO) + "/"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    return [str(Path(f).relative_to(REPO)) for f in json.loads(out.splitlines()[-1])]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_every_module_it_loads(stage):
    spec = STAGES[stage]
    assert spec["cmd"] == f"python -m pipelines.{stage}"
    code_deps = [d for d in spec["deps"] if d.split("/")[0] in PACKAGES]
    assert f"pipelines/{stage}" in code_deps and "pipelines/common" in code_deps
    files = loaded_files(f"pipelines.{stage}.stage") + loaded_files(f"pipelines.{stage}")
    files = [f for f in files if f.split("/")[0] in PACKAGES and f != "pipelines/__init__.py"]  # see below
    assert f"pipelines/{stage}/stage.py" in files
    missing = sorted({f for f in files if not covered(f, code_deps) and f not in PARAMS_VALIDATION_ONLY})
    assert not missing, f"{stage} loads {missing}, which its dvc.yaml deps {code_deps} do not cover"
    other_stages = sorted(
        {f.split("/")[1] for f in files if f.startswith("pipelines/") and f.split("/")[1] in STAGES} - {stage}
    )
    assert not other_stages, f"{stage} imports other stages: {other_stages} (share code through pipelines/common)"


def test_pipelines_package_init_holds_no_code():
    """Every stage loads pipelines/__init__.py, which no stage lists: it must stay a bare docstring."""
    body = ast.parse((REPO / "pipelines/__init__.py").read_text()).body
    assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def test_model_is_pure_pytorch():
    files = [f for f in loaded_files("model") if not f.startswith(".venv/")]
    assert not [f for f in files if not f.startswith("model/")], files
    frameworks = subprocess.run(
        [sys.executable, "-c", "import sys, model; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    banned = {"pytorch_lightning", "lightning", "mlflow", "ray", "prefect", "fastapi", "matplotlib", "pipelines"}
    assert not banned & set(frameworks), banned & set(frameworks)


def imported_modules(path: Path) -> set[str]:
    """quill modules a file imports, at run time or for type checking only (a circle of type-only imports is a
    circle of dependencies all the same)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return {m for m in found if m.split(".")[0] in (*PACKAGES, "flows")}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles():
    files = [p for pkg in (*PACKAGES, "flows") for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    names = {module_name(p): p for p in files}
    # importing a.b.c runs a/__init__ and a/b/__init__ first: the importer depends on those too
    graph = {
        name: {".".join(m.split(".")[:i]) for m in imported_modules(p) for i in range(1, m.count(".") + 2)}
        & set(names) - {name}
        for name, p in names.items()
    }
    state: dict[str, int] = {}
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):  # a module's own package is running
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := dfs(name)):
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
