"""reports/chat_eval/report.md: the chat model next to its base (response bits per byte, end-of-turn rate, lm-eval
tasks), then the sample conversations both answered."""

from __future__ import annotations

from pipelines.common.report import fmt_value, table_cell


def task_rows(chat: dict, base: dict) -> list[str]:
    """| task | shots | metric | chat | base | for every score either model has."""
    rows = []
    for task in sorted({*chat, *base}):
        shots = sorted({*chat.get(task, {}), *base.get(task, {})}, key=lambda k: int(k.removesuffix("shot")))
        for k in shots:
            c, b = chat.get(task, {}).get(k, {}), base.get(task, {}).get(k, {})
            for metric in sorted({*c, *b}):
                rows.append(
                    f"| {task} | {k.removesuffix('shot')} | {metric} | {fmt_value(c.get(metric))} | "
                    f"{fmt_value(b.get(metric))} |"
                )
    return rows


def render_report(metrics: dict, samples: list[dict], identity: dict) -> str:
    lines = [
        "# Evaluation of the chat model",
        "",
        f"The chat model next to its base `{identity['base']}` on {metrics['conversations']} held-out conversations "
        f"(data/chat/test.jsonl; {metrics['response_bytes']} bytes of assistant replies).",
        "",
        "| | chat model | base |",
        "|---|---|---|",
        f"| response bits per byte (lower is better) | **{fmt_value(metrics['response_bpb'])}** | "
        f"{fmt_value(metrics['base_response_bpb'])} |",
        f"| end-of-turn rate (higher is better) | **{fmt_value(metrics['eot_rate'])}** | "
        f"{fmt_value(metrics['base_eot_rate'])} |",
        "",
        f"Response bits per byte: the assistant replies' content given the conversation before it, in ChatML; "
        f"fine-tuning gained {fmt_value(metrics['response_bpb_gain'])} bits per byte. End-of-turn rate: the share of "
        f"replies sampled at temperature {identity['temperature']} that close with `<|im_end|>` within "
        f"{identity['max_tokens']} tokens.",
        "",
        "## Language modelling (lm-evaluation-harness, the quill task pack)",
        "",
        "What fine-tuning for chat cost the model on plain text.",
        "",
        "| task | shots | metric | chat model | base |",
        "|---|---|---|---|---|",
        *task_rows(metrics["tasks"]["chat"], metrics["tasks"]["base"]),
        "",
        "## Samples",
        "",
        f"The last user turn of a conversation, the reply it held, and each model's reply (sampled at temperature "
        f"{identity['temperature']}, seeded, at most {identity['max_tokens']} tokens: the responses the end-of-turn "
        "rate counts; ⏹ marks a reply closed with `<|im_end|>`).",
        "",
        "| prompt | reference | chat model | base |",
        "|---|---|---|---|",
    ]
    for s in samples:
        chat = table_cell(s["chat"]) + (" ⏹" if s["chat_ended"] else "")
        base = table_cell(s["base"]) + (" ⏹" if s["base_ended"] else "")
        lines.append(f"| {table_cell(s['prompt'])} | {table_cell(s['reference'])} | {chat} | {base} |")
    return "\n".join(lines) + "\n"
