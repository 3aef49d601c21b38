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


def render_chat_card(
    name: str,
    version: str,
    config: dict,
    n_params: int,
    metrics: dict,
    finetune: dict,
    lineage: dict,
    samples: list[dict],
    decision: dict,
) -> str:
    """Markdown for one version of the chat model: what it was fine-tuned from and how, next to its base."""
    base = (
        f"{lineage.get('base_model_name', '')} v{lineage['base_model_version']}"
        if lineage.get("base_model_version")
        else lineage.get("base", "its base")
    )
    lines = [
        f"# {name} v{version}",
        "",
        f"A chat model: {base} fine-tuned on conversations in ChatML (`<|im_start|>` / `<|im_end|>`, the template "
        "in its tokenizer files) by the quill pipeline, the loss on the assistant's tokens only.",
        "",
        f"Architecture: the base's ({fmt_value(config.get('n_layer'))} layers, width {fmt_value(config.get('n_embd'))}, "
        f"context {fmt_value(config.get('block_size'))} tokens), {n_params:,} parameters.",
        "",
        "## Data and lineage",
        "",
        *(f"- {k}: `{v}`" for k, v in sorted(lineage.items())),
        "",
        "## Fine-tuning",
        "",
        *(f"- {k}: {fmt_value(v)}" for k, v in sorted(finetune.items())),
        "",
        "## Evaluation (held-out conversations)",
        "",
        f"| model | response bits per byte | end-of-turn rate (T {fmt_value(lineage.get('eot_temperature'))}) |",
        "|---|---|---|",
        f"| base | {fmt_value(metrics.get('base_response_bpb'))} | {fmt_value(metrics.get('base_eot_rate'))} |",
        f"| **{name} v{version}** | **{fmt_value(metrics.get('response_bpb'))}** | "
        f"**{fmt_value(metrics.get('eot_rate'))}** |",
        "",
        f"{fmt_value(metrics.get('conversations'))} conversations. Task pack (what fine-tuning cost in language "
        "modelling):",
        "",
        "| task | metric | chat | base |",
        "|---|---|---|---|",
    ]
    tasks = metrics.get("tasks", {})
    chat, base_tasks = tasks.get("chat", {}), tasks.get("base", {})
    lines += [
        f"| {k.rsplit('.', 1)[0]} | {k.rsplit('.', 1)[-1]} | {fmt_value(v)} | {fmt_value(base_tasks.get(k))} |"
        for k, v in sorted(chat.items())
        if isinstance(v, int | float)
    ]
    lines += ["", "## Samples", "", "| prompt | chat model | base | reference |", "|---|---|---|---|"]
    lines += [
        f"| {table_cell(r.get('prompt'))} | {table_cell(r.get('chat'))} | {table_cell(r.get('base'))} | "
        f"{table_cell(r.get('reference'))} |"
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
        "- As small as its base, with its base's knowledge: it answers in turn and stops, it does not know facts.",
        "- Fine-tuned on open-domain small talk and play dialogue by default, in English; no safety tuning.",
        "- The response bits per byte compare it with its base on the same conversations, not with published models.",
        "",
    ]
    return "\n".join(lines)
