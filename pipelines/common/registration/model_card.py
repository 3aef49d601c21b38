"""The model card: a Markdown description of a registered version (architecture, data, training, eval,
samples, limitations), stored as the MLflow model version's description and beside the model.

    >>> render_card(name="quill-gpt", version="3", config=cfg, ...)
"""

from __future__ import annotations

from pipelines.common.report import fmt_value, table_cell


def render_card(
    name: str,
    version: str,
    config: dict,
    n_params: int,
    eval_metrics: dict,
    train_metrics: dict,
    lineage: dict,
    samples: list[dict],
    decision: dict,
) -> str:
    """Markdown for one version. config: model/config.py's GPTConfig as a dict."""
    ref = eval_metrics.get("reference", {})
    lines = [
        f"# {name} v{version}",
        "",
        "A small decoder-only transformer (Llama layout: RMSNorm, rotary positions, SwiGLU, grouped-query "
        "attention) trained from scratch by the quill pipeline.",
        "",
        "## Architecture",
        "",
        "| field | value |",
        "|---|---|",
        *(
            f"| {k} | {fmt_value(config.get(k))} |"
            for k in (
                "n_layer",
                "n_head",
                "n_kv_head",
                "n_embd",
                "intermediate_size",
                "block_size",
                "vocab_size",
                "tie_embeddings",
            )
        ),
        f"| parameters | {n_params:,} |",
        "",
        "## Data and lineage",
        "",
        *(f"- {k}: `{v}`" for k, v in sorted(lineage.items())),
        "",
        "## Training",
        "",
        *(f"- {k}: {fmt_value(v)}" for k, v in sorted(train_metrics.items())),
        "",
        "## Evaluation (held-out test split)",
        "",
        "| model | bits per byte |",
        "|---|---|",
        f"| uniform over the vocabulary | {fmt_value(ref.get('uniform_bpb'))} |",
        f"| byte {fmt_value(ref.get('ngram_order'))}-gram on the train split | {fmt_value(ref.get('ngram_bpb'))} |",
        f"| **{name} v{version}** | **{fmt_value(eval_metrics.get('test_bpb'))}** |",
        "",
        f"test loss {fmt_value(eval_metrics.get('test_loss'))} nats/token, perplexity {fmt_value(eval_metrics.get('test_ppl'))}.",
        "",
        "| task | shots | metric | value |",
        "|---|---|---|---|",
    ]
    for task, by_shots in sorted(eval_metrics.items()):
        if isinstance(by_shots, dict) and all(k.endswith("shot") for k in by_shots) and by_shots:
            for shots, values in by_shots.items():
                lines += [
                    f"| {task} | {shots.removesuffix('shot')} | {m} | {fmt_value(v)} |" for m, v in values.items()
                ]
    lines += ["", "## Samples", "", "| prompt | generation | reference |", "|---|---|---|"]
    lines += [
        f"| {table_cell(r.get('prompt'))} | {table_cell(r.get('generation'))} | {table_cell(r.get('reference'))} |"
        for r in samples
    ]
    lines += [
        "",
        "## Promotion",
        "",
        f"{'Promoted to champion' if decision['promoted'] else 'Not promoted'}: {decision['why']}",
        "",
        "## Limitations",
        "",
        "- Trained on a small corpus (by default Shakespeare and Milton from Project Gutenberg): it imitates "
        "Early Modern English verse and prose, and knows nothing else.",
        "- A few million parameters and a short context window "
        f"({fmt_value(config.get('block_size'))} tokens): expect locally plausible, globally incoherent text.",
        "- No instruction tuning, no safety filtering; outputs can reproduce the training text verbatim.",
        "- Benchmark scores come from a task pack built from the same corpus's held-out split; they compare "
        "quill models with each other, not with published models.",
        "",
    ]
    return "\n".join(lines)
