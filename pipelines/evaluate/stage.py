"""evaluate: how good is the trained model? Held-out perplexity, lm-eval benchmarks, samples, baselines.

In:  artifacts/model/                  the train stage's Hugging Face folder (+ quill_run.json: MLflow run id)
     data/tokens/test.bin + meta.json  held-out token shard (the model's tokenizer must match meta.json's)
     data/clean/{train,val,test}.jsonl test: task pack items and sample prompts; val: few-shot examples;
                                       train: the n-gram reference model
     params.yaml `eval`                (pipelines/common/params.py documents every key)
Out: metrics/eval.json                 test_loss, test_ppl, test_bpb, test_tokens, test_bytes, one entry per
                                       lm-eval task ({"0shot": {"acc": ...}, "5shot": {...}}), num_fewshot
                                       ("0,5"), reference (uniform_bpb, ngram_bpb), samples (bleu, rougeL),
                                       seconds
     reports/eval/evaluated.json       what was evaluated, for register: model_sha256, tokenizer_sha256,
                                       test_data_sha256, test_window_stride, mlflow_run_id
     reports/eval/report.md            everything above as tables, with the generated samples
     reports/eval/lm_eval/<k>shot.json lm-eval's results JSON per few-shot setting
     reports/eval/samples.json         prompt, reference, generation, BLEU, ROUGE-L per sample
     reports/eval/tasks/               the local task pack (pipelines/common/task_pack.py)
     plots/eval/attention.png          attention heatmaps for the first sample prompt
     plots/eval/bpb.csv                bits per byte: uniform, byte n-gram, this model (`dvc plots show`)
     the training run in MLflow        the same metrics, the files above, a samples table (log_table)
Run: python -m pipelines.evaluate      (or `dvc repro evaluate`)

Inputs are checked before any long work: a missing or incompatible model folder, a tokenizer that is not
the one the shards were made with, an unknown lm-eval task or an unreachable tracking server each stop the
stage with one line saying what to do (exit 1). metrics/eval.json is removed at the start and written only
when everything succeeded, so the register stage never sees the numbers of a failed evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import sacrebleu
import torch
from rouge_score import rouge_scorer

from model import Engine, SamplingParams, hf
from pipelines.common import tracking
from pipelines.common.atomic import atomic_file, write_json, write_text
from pipelines.common.benchmarks import build_pack, check_tasks, task_scores
from pipelines.common.clean_split import read_texts
from pipelines.common.hashing import content_hash, sha256_file
from pipelines.common.heldout import held_out
from pipelines.common.layout import PROJECT, Layout
from pipelines.common.lm_eval_adapter import split_documents
from pipelines.common.model_folder import check_model_dir
from pipelines.common.params import EvalParams, Params
from pipelines.common.report import fmt_value, table_cell
from pipelines.common.runner import StageError, run_in, stage_arguments, stage_log
from pipelines.common.tracking import check_tracking, training_run_id
from pipelines.evaluate.attention_plot import plot_attention
from pipelines.evaluate.ngram import ByteNgram, uniform_bpb

IDENTITY = ("model_sha256", "tokenizer_sha256", "test_data_sha256", "test_window_stride", "mlflow_run_id")


class EvalError(StageError):
    """The inputs cannot be evaluated; the message says what is wrong and what to do."""


log = stage_log("evaluate")


# --- checks before any long work -------------------------------------------------------------------


def check_tokenizer(model_dir: Path, meta: dict) -> None:
    """The model's tokenizer must be the one it was trained with and the one that wrote the token shards."""
    try:
        hf.check_tokenizer(model_dir)
    except hf.TokenizerMismatchError as exc:
        raise EvalError(f"{exc}; re-export the model (dvc repro train)") from None
    actual = sha256_file(model_dir / "tokenizer.json")
    if meta.get("tokenizer_sha256") != actual:
        raise EvalError(
            f"tokenizer mismatch: the model in {model_dir} uses tokenizer {actual[:12]}, but data/tokens was "
            f"made with {str(meta.get('tokenizer_sha256'))[:12]}; retrain on the current tokens "
            "(dvc repro train) or restore the matching data"
        )


def read_meta(tokens_dir: Path) -> dict:
    meta_file = tokens_dir / "meta.json"
    if not meta_file.is_file() or not (tokens_dir / "test.bin").is_file():
        raise EvalError(f"{tokens_dir}/meta.json or test.bin missing: run the tokenize stage (dvc repro tokenize)")
    return json.loads(meta_file.read_text())


# --- samples and reference models ------------------------------------------------------------------


def sample_prompts(params: EvalParams, test_texts: list[str], train_path: Path, encode, decode) -> list[dict]:
    """Fixed prompts (params) and prompts cut from test documents, each with its true continuation if known:
    the text after the prompt's first occurrence in the test split, else in the train split."""
    n_ref = params.sample_max_tokens

    def continuation(text: str, at: int) -> str:
        return decode(encode(text[at : at + 8 * n_ref])[:n_ref])

    rows = []
    for prompt in params.sample_prompts:
        ref = None
        for text in test_texts:
            at = text.find(prompt)
            if at >= 0:
                ref = continuation(text, at + len(prompt))
                break
        if ref is None and train_path.is_file():
            with open(train_path, encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["text"]
                    at = text.find(prompt)
                    if at >= 0:
                        ref = continuation(text, at + len(prompt))
                        break
        rows.append({"source": "params", "prompt": prompt, "reference": ref})
    rng = random.Random(f"{params.seed}:samples")
    docs = [t for t in test_texts if len(t.split()) > 40]
    for text in rng.sample(docs, min(params.samples_from_test, len(docs))):
        words = text.split(" ")
        cut = len(" ".join(words[:12]))
        rows.append({"source": "test", "prompt": text[:cut], "reference": continuation(text, cut)})
    return rows


def generate_samples(engine, rows: list[dict], max_tokens: int, seed: int) -> dict:
    """Generate for each prompt with the default sampling settings; BLEU and ROUGE-L against the reference."""
    if not rows:
        return {"rows": [], "bleu": None, "rougeL": None}
    params = SamplingParams(max_tokens=max_tokens, seed=seed)
    completions = engine.generate([r["prompt"] for r in rows], params)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    hyps, refs = [], []
    for row, c in zip(rows, completions):
        row["generation"] = c.text
        if row["reference"]:
            row["bleu"] = round(sacrebleu.sentence_bleu(c.text, [row["reference"]]).score, 4)
            row["rougeL"] = round(scorer.score(row["reference"], c.text)["rougeL"].fmeasure, 4)
            hyps.append(c.text)
            refs.append(row["reference"])
        else:
            row["bleu"] = row["rougeL"] = None
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score if hyps else None
    rouge = float(np.mean([r["rougeL"] for r in rows if r["rougeL"] is not None])) if hyps else None
    return {"rows": rows, "bleu": bleu, "rougeL": rouge}


def attention_png(engine, prompt: str, path: Path) -> Path:
    """Heatmaps of every layer and head for one prompt (pipelines/evaluate/attention_plot.py)."""
    ids = engine.encode(prompt)[: min(32, engine.config.block_size)] or [engine.eos_token_id]
    with torch.inference_mode():
        maps = engine.model.attention_maps(torch.tensor([ids], device=engine.device))
    return plot_attention(maps, [engine.token_text(t) for t in ids], path)


# --- the report ------------------------------------------------------------------------------------


def render_report(metrics: dict, samples: list[dict], model_dir: Path) -> str:
    lines = [
        f"# Evaluation of `{model_dir}`",
        "",
        "## Held-out test split (sliding window)",
        "",
        "| model | loss (nats/token) | perplexity | bits per byte |",
        "|---|---|---|---|",
        f"| uniform over the vocabulary | {fmt_value(metrics['reference']['uniform_loss'])} | "
        f"{fmt_value(metrics['reference']['uniform_ppl'])} | {fmt_value(metrics['reference']['uniform_bpb'])} |",
        f"| byte {metrics['reference']['ngram_order']}-gram (train split) | – | – | "
        f"{fmt_value(metrics['reference']['ngram_bpb'])} |",
        f"| **this model** | {fmt_value(metrics['test_loss'])} | {fmt_value(metrics['test_ppl'])} | "
        f"**{fmt_value(metrics['test_bpb'])}** |",
        "",
        f"{metrics['test_tokens']} tokens, {metrics['test_bytes']} bytes of text.",
        "",
        "## Benchmarks (lm-evaluation-harness)",
        "",
        "| task | shots | metric | value |",
        "|---|---|---|---|",
    ]
    for task in metrics["task_names"]:
        for shots, values in metrics.get(task, {}).items():
            for metric, value in values.items():
                lines.append(f"| {task} | {shots.removesuffix('shot')} | {metric} | {fmt_value(value)} |")
    lines += [
        "",
        "## Samples (default sampling settings)",
        "",
        f"Corpus BLEU {fmt_value(metrics['samples']['bleu'])}, mean ROUGE-L {fmt_value(metrics['samples']['rougeL'])} "
        "against the true continuation.",
        "",
        "| prompt | generation | reference | BLEU | ROUGE-L |",
        "|---|---|---|---|---|",
    ]
    for r in samples:
        lines.append(
            f"| {table_cell(r['prompt'])} | {table_cell(r['generation'])} | {table_cell(r['reference'])} | "
            f"{fmt_value(r['bleu'])} | {fmt_value(r['rougeL'])} |"
        )
    return "\n".join(lines) + "\n"


# --- MLflow ----------------------------------------------------------------------------------------


def log_to_mlflow(model_dir: Path, metrics: dict, samples: list[dict], layout: Layout) -> str:
    """Log metrics, reports, plots and the samples table to the training run (or a new run if it has none)."""
    client = tracking.mlflow_client()
    run_id = tracking.evaluation_run(client, training_run_id(model_dir), "evaluate", log)
    tracking.log_metric_tree(client, run_id, "eval", metrics)
    client.set_tag(run_id, "quill.evaluated", "true")
    client.log_artifacts(run_id, str(layout.eval_reports), artifact_path="eval")
    client.log_artifacts(run_id, str(layout.eval_plots), artifact_path="plots/eval")
    client.log_dict(run_id, metrics, "metrics/eval.json")
    columns = ["source", "prompt", "generation", "reference", "bleu", "rougeL"]
    client.log_table(run_id, {c: [r.get(c) for r in samples] for c in columns}, artifact_file="eval/samples_table.json")
    return run_id


# --- the stage -------------------------------------------------------------------------------------


def check_inputs(params: EvalParams, layout: Layout) -> dict:
    """Everything that can be wrong with the inputs, before any long work; the token shards' meta.json."""
    check_model_dir(layout.model)
    meta = read_meta(layout.tokens)
    check_tokenizer(layout.model, meta)
    for split in ("train", "val", "test"):
        if not (layout.clean / f"{split}.jsonl").is_file():
            raise EvalError(f"{layout.clean}/{split}.jsonl missing: run the clean stage (dvc repro clean)")
    check_tasks(params.tasks)
    check_tracking()
    return meta


def load_engine(model_dir: Path, meta: dict) -> Engine:
    try:
        engine = Engine.from_pretrained(model_dir)
    except Exception as exc:  # weights that do not fit the config, unreadable safetensors, ...
        raise EvalError(f"cannot load the model in {model_dir}: {exc}; re-export it (dvc repro train)") from None
    if meta["vocab_size"] > engine.config.vocab_size:
        raise EvalError(
            f"the model's vocab_size {engine.config.vocab_size} is smaller than the tokenizer's "
            f"{meta['vocab_size']}: retrain (dvc repro train)"
        )
    return engine


def held_out_metrics(
    engine: Engine, meta: dict, test_texts: list[str], params: EvalParams, layout: Layout, rolling_cache: dict
) -> dict:
    """test_loss/ppl/bpb on the test shard, beside the uniform and byte n-gram references."""
    tokens = np.memmap(layout.tokens / "test.bin", dtype=meta["dtype"], mode="r")
    docs = split_documents(np.asarray(tokens), meta["eot_id"])
    n_bytes = meta["splits"]["test"]["bytes"]
    log(f"held-out loss over {len(tokens)} test tokens (stride {params.stride or engine.config.block_size})")
    metrics = held_out(
        engine.model, docs, meta["eot_id"], n_bytes, params.stride, params.batch_size, cache=rolling_cache
    )
    log(f"byte {params.ngram_order}-gram reference on the train split")
    ngram = ByteNgram.fit([t.encode() for t in read_texts(layout.clean / "train.jsonl")], params.ngram_order)
    vocab = meta["vocab_size"]
    metrics["reference"] = {
        "uniform_loss": math.log(vocab),
        "uniform_ppl": float(vocab),
        "uniform_bpb": uniform_bpb(metrics["test_tokens"], n_bytes, vocab),
        "ngram_order": params.ngram_order,
        "ngram_bpb": ngram.bits_per_byte([t.encode() for t in test_texts]),
    }
    return metrics


def benchmark_scores(
    engine: Engine, test_texts: list[str], params: EvalParams, layout: Layout, rolling_cache: dict
) -> dict:
    """The lm-eval tasks (the local pack built from the test and val splits, or standard ones)."""
    build_pack(test_texts, read_texts(layout.clean / "val.jsonl"), layout.eval_reports / "tasks", params)
    return task_scores(
        engine, params, layout.eval_reports / "tasks", layout.eval_reports / "lm_eval", rolling_cache, log=log
    )


def write_outputs(metrics: dict, samples: list[dict], params: EvalParams, layout: Layout) -> dict:
    """Reports, plots, MLflow, then metrics/eval.json last: register only ever sees a complete evaluation."""
    write_json(layout.eval_reports / "samples.json", samples)
    write_text(
        layout.eval_reports / "report.md",
        render_report({**metrics, "task_names": list(params.tasks)}, samples, layout.model),
    )
    with atomic_file(layout.eval_plots / "bpb.csv") as tmp:
        tmp.write_text(
            "model,bpb\n"
            f"uniform,{metrics['reference']['uniform_bpb']:.6f}\n"
            f"byte_{params.ngram_order}gram,{metrics['reference']['ngram_bpb']:.6f}\n"
            f"quill,{metrics['test_bpb']:.6f}\n"
        )
    metrics["mlflow_run_id"] = log_to_mlflow(layout.model, metrics, samples, layout)
    write_json(layout.evaluated, {k: metrics[k] for k in IDENTITY})
    # the identity strings stay out of `dvc metrics show`'s table
    write_json(layout.eval_metrics, {k: v for k, v in metrics.items() if k not in IDENTITY})
    log(f"logged to MLflow run {metrics['mlflow_run_id']}")
    return metrics


def evaluate(params: EvalParams, layout: Layout = PROJECT) -> dict:
    """Check inputs, then compute every metric and write every output; return metrics/eval.json's content."""
    started = time.perf_counter()
    meta = check_inputs(params, layout)
    layout.eval_metrics.unlink(missing_ok=True)  # a failure below must not leave the previous numbers for register
    torch.manual_seed(params.seed)
    engine = load_engine(layout.model, meta)
    rolling_cache: dict[tuple, float] = {}  # held-out log-likelihoods, reused by lm-eval's perplexity task
    test_texts = read_texts(layout.clean / "test.jsonl")
    metrics = held_out_metrics(engine, meta, test_texts, params, layout, rolling_cache)
    metrics.update(benchmark_scores(engine, test_texts, params, layout, rolling_cache))

    log("generation samples")
    rows = sample_prompts(params, test_texts, layout.clean / "train.jsonl", engine.encode, engine.decode)
    samples = generate_samples(engine, rows, params.sample_max_tokens, params.seed)
    attention_png(engine, rows[0]["prompt"] if rows else "The", layout.eval_plots / "attention.png")

    metrics["num_fewshot"] = ",".join(str(k) for k in params.num_fewshot)
    metrics["samples"] = {"bleu": samples["bleu"], "rougeL": samples["rougeL"], "count": len(samples["rows"])}
    metrics["model_sha256"] = content_hash(layout.model / "model.safetensors")
    metrics["tokenizer_sha256"] = sha256_file(layout.model / "tokenizer.json")
    metrics["test_data_sha256"] = content_hash(layout.clean / "test.jsonl")
    metrics["test_window_stride"] = params.stride or engine.config.block_size
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    return write_outputs(metrics, samples["rows"], params, layout)


def summarize(params: Params, layout: Layout) -> str:
    """Evaluate artifacts/model; the line printed on success."""
    metrics = evaluate(params.eval, layout)
    tasks = {k: v for k, v in metrics.items() if isinstance(v, dict) and k not in ("reference", "samples")}
    return (
        f"test_loss {metrics['test_loss']:.4f}, test_ppl {metrics['test_ppl']:.2f}, "
        f"test_bpb {metrics['test_bpb']:.4f} (byte n-gram {metrics['reference']['ngram_bpb']:.4f}, "
        f"uniform {metrics['reference']['uniform_bpb']:.4f}); tasks {json.dumps(tasks)}; {metrics['seconds']} s"
    )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="evaluate this model folder instead of the root's artifacts/model")
    parser.add_argument(
        "--out", type=Path, help="write reports/eval, metrics/eval.json and plots/eval under this folder instead"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.evaluate [--root DIR] [--model DIR] [--out DIR]`: the exit status (runner.py).

    --model and --out evaluate another model folder (a registered version, downloaded) on the project's data
    without touching the outputs DVC tracks."""
    args = stage_arguments("evaluate", argv, options)
    layout = PROJECT.under(args.root)
    if args.model:
        layout = replace(layout, model=args.model)
    if args.out:
        out = PROJECT.under(args.out)
        layout = replace(
            layout, eval_reports=out.eval_reports, eval_metrics=out.eval_metrics, eval_plots=out.eval_plots
        )
    return run_in("evaluate", summarize, layout)
