"""chat_eval: how much better a chat partner is the fine-tuned model than its base? Both on held-out conversations.

In:  artifacts/chat_model/            the finetune stage's chat model (ChatML chat_template, quill_run.json: its
                                      MLflow run and the base it was fine-tuned from)
     the base                         as quill_run.json records it, else finetune.base: artifacts/model (the
                                      default), a registry version (downloaded), a local Hugging Face folder
     data/chat/test.jsonl             held-out conversations (chat_data), at most finetune.eval.max_conversations
     data/clean/{test,val}.jsonl      the quill task pack's items and few-shot examples (when eval.tasks is set)
     params.yaml                      finetune.eval (sampling, sample count), finetune.base, and the evaluate
                                      stage's eval.tasks, num_fewshot, limit, batch_size, stride, max_items, seed
Out: metrics/chat_eval.json           response_bpb, eot_rate, base_response_bpb, base_eot_rate, response_bpb_gain,
                                      conversations, response_bytes, response_tokens, tasks {chat, base}, seconds
     reports/chat_eval/evaluated.json what the metrics describe (for chat_register): model_sha256, base,
                                      base_model_sha256, test_data_sha256, tokenizer_sha256, mlflow_run_id,
                                      temperature, max_tokens, response_scorer
     reports/chat_eval/report.md      chat model vs base as tables, then the samples
     reports/chat_eval/samples.json   prompt (last user turn), reference reply, each model's reply
     reports/chat_eval/tasks/         the quill task pack (pipelines/common/task_pack.py), as evaluate builds it
     reports/chat_eval/lm_eval/{chat,base}/<k>shot.json   lm-eval's results
     the finetune run in MLflow       chat_eval.* metrics, the report folder, a samples table
Run: python -m pipelines.chat_eval [--root DIR]   (or `dvc repro chat_eval`)

Both models read the conversations through the chat model's tokenizer (the base's own, with the chat template).
response_bpb (pipelines/common/chat_test.py): bits per UTF-8 byte of the assistant messages' content, each reply given the whole
conversation before it. eot_rate (end_of_turn.py): the share of sampled last replies that close with <|im_end|>
within finetune.eval.max_tokens. tasks: eval.tasks through lm-eval, as the evaluate stage runs them, for both.
Bad inputs (no chat model, no chat template, no test split, an empty one, an unknown task) stop the stage before
any long work with one line saying what to run. metrics/chat_eval.json is removed at the start and written last.
"""

from __future__ import annotations

import json
import time

from model import Engine, SamplingParams
from model.chat import chat_markers, literal
from pipelines.chat_eval.end_of_turn import ended, eot_rate, generation_rows, last_reply, prompt_ids, respond
from pipelines.chat_eval.models import base_engine, base_spec, chat_engine, check_chat_model
from pipelines.chat_eval.report import render_report
from pipelines.common import tracking
from pipelines.common.atomic import scratch_dir, write_json, write_text
from pipelines.common.base_model import Base, resolve_base
from pipelines.common.benchmarks import build_pack, check_tasks, task_scores
from pipelines.common.chat_test import RESPONSE_SCORER, Messages, held_out_conversations, response_score
from pipelines.common.clean_split import read_texts
from pipelines.common.hashing import content_hash, sha256_file
from pipelines.common.layout import PROJECT, Layout
from pipelines.common.params import ChatEvalParams, EvalParams, Params
from pipelines.common.progress import progress_bar, reporter
from pipelines.common.runner import StageError, run_stage, stage_log
from pipelines.common.tracking import training_run_id

SCRATCH = ".chat_eval-scratch-"  # a registry base, downloaded beside reports/chat_eval; removed on exit
SAMPLE_COLUMNS = ("prompt", "reference", "chat", "base", "chat_ended", "base_ended")

log = stage_log("chat_eval")


class ChatEvalError(StageError):
    """The inputs cannot be evaluated; the message says what is wrong and what to do."""


# --- checks before any long work -------------------------------------------------------------------


def check_inputs(params: Params, layout: Layout) -> ChatEvalParams:
    """Everything that can be wrong with the inputs, before any model is loaded; finetune.eval."""
    if params.finetune is None:
        raise ChatEvalError("params.yaml has no finetune section (finetune.base, finetune.eval, ...)")
    check_chat_model(layout.chat_model)
    if params.eval.tasks:
        for split in ("test", "val"):
            if not (layout.clean / f"{split}.jsonl").is_file():
                raise ChatEvalError(
                    f"{layout.clean}/{split}.jsonl missing (the task pack's items): run dvc repro clean"
                )
    check_tasks(params.eval.tasks)
    tracking.check_tracking()
    return params.finetune.eval


# --- one model -----------------------------------------------------------------------------------------


def measure(engine: Engine, name: str, conversations: list[Messages], e: ChatEvalParams, batch_size: int) -> dict:
    """Response bits per byte and sampled last replies of one model."""
    tokenizer = literal(engine.tokenizer)
    _, im_end = chat_markers(tokenizer)
    score = response_score(
        engine.model,
        tokenizer,
        conversations,
        batch_size,
        progress=progress_bar(f"chat_eval: {name} response bpb", "window"),
    )
    prompts = prompt_ids(tokenizer, conversations, engine.config.block_size - e.max_tokens)
    sampling = SamplingParams(max_tokens=e.max_tokens, temperature=e.temperature, stop_token_ids=[im_end])
    with reporter(len(prompts), f"chat_eval: {name} end of turn", "response") as bar:
        replies = respond(engine, prompts, sampling, e.seed, generation_rows(engine.config), bar.update)
    rate = eot_rate(replies, im_end)
    log(f"{name}: response bpb {score.bpb:.4f} over {score.tokens} tokens, end-of-turn rate {rate:.3f}")
    return {"score": score, "replies": replies, "eot_rate": rate, "ended": [ended(r, im_end) for r in replies]}


def weights_hash(base: Base) -> str:
    """content_hash of the base's model.safetensors (what evaluate's model_sha256 is); for a sharded base, its
    shards' sha256s."""
    single = base.folder / "model.safetensors"
    return content_hash(single) if single.is_file() else base.weights_sha256


def evaluated_tasks(layout: Layout, params: EvalParams, base_sha256: str) -> dict | None:
    """The base's task scores from metrics/eval.json when the evaluate stage scored this very model (its weights'
    hash) on the same pack (built from the same data and eval.* keys, which dvc.yaml gives both stages); None
    otherwise. Saves scoring the base's task pack twice in a `dvc repro`."""
    if not (layout.eval_metrics.is_file() and layout.evaluated.is_file()):
        return None
    metrics, evaluated = json.loads(layout.eval_metrics.read_text()), json.loads(layout.evaluated.read_text())
    shots = ",".join(str(k) for k in params.num_fewshot)
    if evaluated.get("model_sha256") != base_sha256 or metrics.get("num_fewshot") != shots:
        return None
    if not all(isinstance(metrics.get(task), dict) for task in params.tasks):
        return None
    log(f"base: task scores from {layout.eval_metrics} (the evaluate stage scored these weights on the same pack)")
    return {task: metrics[task] for task in params.tasks}


# --- samples, MLflow ----------------------------------------------------------------------------------


def sample_rows(conversations: list[Messages], chat: dict, base: dict, n: int) -> list[dict]:
    """The first n conversations: the last user turn before the last reply, that reply, both models' replies."""
    rows = []
    for i, messages in enumerate(conversations[:n]):
        last = last_reply(messages)
        prompt = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), None)
        rows.append(
            {
                "prompt": prompt,
                "reference": messages[last]["content"],
                "chat": chat["replies"][i].text,
                "base": base["replies"][i].text,
                "chat_ended": chat["ended"][i],
                "base_ended": base["ended"][i],
            }
        )
    return rows


def log_to_mlflow(layout: Layout, metrics: dict, samples: list[dict], uri: str) -> str:
    """chat_eval.* metrics, the report folder and a samples table on the finetune run (a new run if the store
    lacks it)."""
    client = tracking.mlflow_client(uri)
    run_id = tracking.evaluation_run(client, training_run_id(layout.chat_model), "chat_eval", log)
    tracking.log_metric_tree(client, run_id, "chat_eval", metrics)
    client.set_tag(run_id, "quill.chat_evaluated", "true")
    client.log_artifacts(run_id, str(layout.chat_eval_reports), artifact_path="chat_eval")
    client.log_dict(run_id, metrics, "metrics/chat_eval.json")
    table = {c: [r[c] for r in samples] for c in SAMPLE_COLUMNS}
    client.log_table(run_id, table, artifact_file="chat_eval/samples_table.json")
    return run_id


# --- the stage -------------------------------------------------------------------------------------


def chat_eval(params: Params, layout: Layout = PROJECT, *, tracking_uri: str | None = None) -> dict:
    """Check inputs, score the chat model and its base, write every output; return metrics/chat_eval.json."""
    started = time.perf_counter()
    e = check_inputs(params, layout)
    uri = tracking_uri or tracking.tracking_uri()
    layout.chat_eval_metrics.unlink(missing_ok=True)  # a failure below must not leave the previous numbers
    conversations = held_out_conversations(layout.chat / "test.jsonl", e.max_conversations)
    chat = chat_engine(layout.chat_model)
    if e.max_tokens >= chat.config.block_size:
        raise ChatEvalError(
            f"finetune.eval.max_tokens={e.max_tokens} leaves no room for a prompt in the chat model's context "
            f"({chat.config.block_size} tokens); lower it"
        )
    pack = layout.chat_eval_reports / "tasks"
    if params.eval.tasks:
        build_pack(read_texts(layout.clean / "test.jsonl"), read_texts(layout.clean / "val.jsonl"), pack, params.eval)
    spec, resolve = base_spec(layout.chat_model, params.finetune.base)
    log(f"{len(conversations)} held-out conversations; base {spec}")
    results: dict[str, dict] = {}
    with scratch_dir(layout.chat_eval_reports.parent, SCRATCH) as scratch:
        base = resolve_base(resolve, layout, scratch, uri)
        base_sha256 = weights_hash(base)
        for name, engine in (("chat", chat), ("base", base_engine(base, chat))):
            results[name] = measure(engine, name, conversations, e, params.eval.batch_size)
            scored = evaluated_tasks(layout, params.eval, base_sha256) if name == "base" else None
            results[name]["tasks"] = scored or task_scores(
                engine, params.eval, pack, layout.chat_eval_reports / "lm_eval" / name, log=log
            )

    chat_score, base_score = results["chat"]["score"], results["base"]["score"]
    metrics = {
        "response_bpb": chat_score.bpb,
        "eot_rate": results["chat"]["eot_rate"],
        "base_response_bpb": base_score.bpb,
        "base_eot_rate": results["base"]["eot_rate"],
        "response_bpb_gain": base_score.bpb - chat_score.bpb,
        "conversations": len(conversations),
        "response_bytes": chat_score.bytes,
        "response_tokens": chat_score.tokens,
        "tasks": {name: results[name]["tasks"] for name in ("chat", "base")},
    }
    identity = {
        "model_sha256": content_hash(layout.chat_model / "model.safetensors"),
        "base": spec,
        "base_model_sha256": base_sha256,
        "test_data_sha256": content_hash(layout.chat / "test.jsonl"),
        "tokenizer_sha256": sha256_file(layout.chat_model / "tokenizer.json"),
        "temperature": e.temperature,
        "max_tokens": e.max_tokens,
        "response_scorer": RESPONSE_SCORER,
    }
    samples = sample_rows(conversations, results["chat"], results["base"], e.samples)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    return write_outputs(metrics, identity, samples, layout, uri)


def write_outputs(metrics: dict, identity: dict, samples: list[dict], layout: Layout, uri: str) -> dict:
    """Report and samples, MLflow, evaluated.json, then metrics/chat_eval.json last: chat_register only ever sees
    a complete evaluation."""
    write_json(layout.chat_samples, samples)
    write_text(layout.chat_eval_reports / "report.md", render_report(metrics, samples, identity))
    identity["mlflow_run_id"] = log_to_mlflow(layout, metrics, samples, uri)
    write_json(layout.chat_evaluated, identity)
    write_json(layout.chat_eval_metrics, metrics)
    log(f"logged to MLflow run {identity['mlflow_run_id']}")
    return metrics


def summarize(params: Params, layout: Layout) -> str:
    """Evaluate artifacts/chat_model next to its base; the line printed on success."""
    m = chat_eval(params, layout)
    headline = {k: v for k, v in m.items() if k != "tasks"}
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in headline.items()})


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.chat_eval [--root DIR]`: the exit status (pipelines/common/runner.py)."""
    return run_stage("chat_eval", summarize, argv)
