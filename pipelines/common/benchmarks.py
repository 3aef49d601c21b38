"""lm-eval benchmarks as the stages run them: `eval.tasks` checked up front, the local task pack built, each task
run at each `eval.num_fewshot` setting, the scores flattened.

The evaluate stage scores the trained model with them; chat_eval scores the chat model and its base on the same
pack, so what fine-tuning cost in language modelling reads off the same table.

    >>> check_tasks(params.tasks)
    >>> build_pack(test_texts, val_texts, Path("reports/eval/tasks"), params)
    >>> task_scores(engine, params, Path("reports/eval/tasks"), Path("reports/eval/lm_eval"), log=stage_log("evaluate"))
    {'quill_cloze': {'0shot': {'acc': 0.31, 'perplexity': 412.0}}, ...}
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager, get_task_dict

from model import Engine
from pipelines.common.atomic import atomic_file
from pipelines.common.errors import StageError
from pipelines.common.lm_eval_adapter import QuillLM
from pipelines.common.params import EvalParams
from pipelines.common.task_pack import TASKS, build_task_pack


class BenchmarkError(StageError):
    """An lm-eval task cannot be found or loaded; the message says what to do."""


def check_tasks(tasks: list[str]) -> None:
    """Every eval.tasks name is in the local pack or known to lm-eval."""
    unknown = [t for t in tasks if t not in TASKS]
    if not unknown:
        return
    known = set(TaskManager().all_tasks)
    unknown = [t for t in unknown if t not in known]
    if unknown:
        raise BenchmarkError(
            f"unknown lm-eval task(s) in eval.tasks: {', '.join(unknown)}; the local pack has "
            f"{', '.join(TASKS)} and `lm-eval ls tasks` lists the standard ones"
        )


def build_pack(test_texts: Sequence[str], fewshot_texts: Sequence[str], pack_dir: Path, params: EvalParams) -> None:
    """The local task pack (pipelines/common/task_pack.py) of eval.max_items items per task, drawn with eval.seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_task_pack(test_texts, fewshot_texts, pack_dir, params.max_items, params.seed)


def task_scores(
    engine: Engine,
    params: EvalParams,
    pack_dir: Path,
    out_dir: Path,
    rolling_cache: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """eval.tasks at each eval.num_fewshot for one model ({task: {"<k>shot": {metric: value}}}); lm-eval's raw
    results to out_dir. rolling_cache: QuillLM's, when the caller already scored the perplexity task's documents."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = QuillLM(engine=engine, batch_size=params.batch_size, stride=params.stride, rolling_cache=rolling_cache)
        return run_lm_eval(lm, params.tasks, params.num_fewshot, pack_dir, params.limit, params.seed, out_dir, log)


def run_lm_eval(
    lm,
    tasks: list[str],
    fewshots: list[int],
    pack_dir: Path,
    limit: int | None,
    seed: int,
    out_dir: Path,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Each task at each few-shot setting ({task: {"<k>shot": {metric: value}}}); raw results to out_dir; progress
    lines to log (a stage_log)."""
    log = log or (lambda _: None)
    if not tasks:
        return {}
    # lm-eval indexes its thousands of bundled task files unless told not to (half a minute on 2 CPU cores): only
    # when eval.tasks names one of them
    manager = TaskManager(include_path=str(pack_dir), include_defaults=not set(tasks) <= set(TASKS))
    try:
        task_dict = get_task_dict(tasks, manager)
    except Exception as exc:  # a standard task whose dataset needs the network, a broken YAML, ...
        raise BenchmarkError(
            f"lm-eval could not load tasks {tasks}: {exc}. Standard tasks download their data; "
            "without network use the local quill_* tasks"
        ) from None
    rolling = {
        name for name, task in task_dict.items() if getattr(task, "OUTPUT_TYPE", None) == "loglikelihood_rolling"
    }
    scores: dict[str, dict] = {}
    for k in fewshots:
        names = [t for t in tasks if k == 0 or t not in rolling]  # perplexity tasks have no few-shot form
        if not names:
            continue
        log(f"lm-eval {k}-shot: {', '.join(names)}")
        seen, cut = lm.loglikelihood_requests, lm.truncated_requests
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=k,
            task_manager=manager,
            limit=limit,
            log_samples=False,
            # no bootstrapped standard errors: the scores quill keeps have none, and lm-eval bootstraps the
            # perplexity metrics in a forked multiprocessing pool, which can hang in a process holding torch's
            # threads (seen once in the test suite: the pool never joined)
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        seen, cut = lm.loglikelihood_requests - seen, lm.truncated_requests - cut
        if cut:
            log(
                f"  {cut} of {seen} {k}-shot loglikelihood requests were longer than the model's context "
                f"({lm.max_length} tokens) and lost their start, as lm-eval's Hugging Face model does"
            )
        with atomic_file(out_dir / f"{k}shot.json") as tmp:
            tmp.write_text(json.dumps(results, indent=2, default=str, sort_keys=True) + "\n")
        for task, values in results["results"].items():
            for key, value in values.items():
                metric, _, _filter = key.partition(",")
                if _filter and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                    scores.setdefault(task, {}).setdefault(f"{k}shot", {})[metric] = float(value)
    return scores
