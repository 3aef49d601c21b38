"""The one `main()` convention: every stage's `__main__` is `sys.exit(run_stage("<stage>", work))`.

`work(params)` does the stage's job and returns the one-line summary printed on success. Expected failures
(a bad params.yaml, a `StageError`, an MLflow store that does not answer) become one line on stderr,
`<stage>: error: <what is wrong and what to do>`, and exit status 1 (or the error's own `exit_code`), never a
traceback. Anything else is a bug and keeps its traceback.

    >>> sys.exit(run_stage("clean", lambda params: f"{clean(params.data)['docs_out']} documents kept"))
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipelines.common.errors import StageError
from pipelines.common.params import Params, ParamsError, load_params
from pipelines.common.tracking import tracking_uri

__all__ = ["StageError", "run_stage", "stage_log"]


def run_stage(name: str, work: Callable[[Params], str]) -> int:
    """Load params.yaml, run work(params), print its summary; the exit status for sys.exit."""
    try:
        summary = work(load_params())
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
