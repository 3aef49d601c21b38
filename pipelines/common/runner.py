"""The one `main()` convention: every stage's `__main__` is `sys.exit(run_stage("<stage>", work))`.

`work(params, layout)` does the stage's job on the project `layout` (pipelines/common/layout.py) and returns the
one-line summary printed on success. Every stage takes `--root DIR` to run against another project root (its
params.yaml, inputs and outputs), the current folder by default. Expected failures (a bad params.yaml, a
`StageError`, an MLflow store that does not answer) become one line on stderr, `<stage>: error: <what is wrong
and what to do>`, and exit status 1 (or the error's own `exit_code`), never a traceback. Anything else is a bug
and keeps its traceback.

    >>> sys.exit(run_stage("clean", lambda params, layout: f"{clean(params.data, layout)['docs_out']} kept"))
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipelines.common.errors import StageError
from pipelines.common.layout import PROJECT, Layout
from pipelines.common.params import Params, ParamsError, load_params
from pipelines.common.tracking import tracking_uri

__all__ = ["StageError", "run_in", "run_stage", "stage_arguments", "stage_log"]

Work = Callable[[Params, Layout], str]


def stage_arguments(name: str, argv: Sequence[str] | None = None, options=None) -> argparse.Namespace:
    """The stage's command line: `--root DIR`, plus what `options(parser)` adds; exits with usage when bad."""
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{name}", description=f"the {name} stage (dvc.yaml)")
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="project root: its params.yaml, inputs and outputs (default: .)"
    )
    if options:
        options(parser)
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root}: no such folder; give the project root that holds params.yaml")
    if args.root != Path(".") and not os.environ.get("MLFLOW_TRACKING_URI"):
        # another project's runs go to its own store, as they would if the stage ran in that folder
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(args.root / 'mlflow.db').resolve()}"
    return args


def run_stage(name: str, work: Work, argv: Sequence[str] | None = None) -> int:
    """Parse the command line, load the root's params.yaml, run work(params, layout); the exit status."""
    return run_in(name, work, PROJECT.under(stage_arguments(name, argv).root))


def run_in(name: str, work: Work, layout: Layout) -> int:
    """Run work on `layout` with its params.yaml, print its summary; the exit status for sys.exit."""
    try:
        summary = work(load_params(layout.params), layout)
    except (ParamsError, StageError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr, flush=True)
        return getattr(exc, "exit_code", 1)
    except Exception as exc:
        if not type(exc).__module__.startswith("mlflow"):
            raise
        print(f"{name}: error: MLflow ({tracking_uri()}): {exc}; check the tracking server", file=sys.stderr)
        return 1
    print(f"{name}: {summary}", flush=True)
    return 0


def stage_log(name: str) -> Callable[[str], None]:
    """A progress line printer for one stage: `<stage>: <msg>` on stderr (stdout keeps the summary)."""

    def log(msg: str) -> None:
        print(f"{name}: {msg}", file=sys.stderr, flush=True)

    return log
