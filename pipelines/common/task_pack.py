"""The local lm-eval task pack: three benchmarks built offline and deterministically from held-out text.

    >>> build_task_pack(test_texts, fewshot_texts, Path("reports/eval/tasks"), max_items=200, seed=1234)
    >>> TaskManager(include_path="reports/eval/tasks").all_tasks  # ... quill_cloze, quill_nextline, quill_perplexity

- quill_cloze (LAMBADA-style, loglikelihood): a passage of a few lines with its final word removed;
  accuracy = the model's greedy continuation is exactly that word; also the word's perplexity.
- quill_nextline (HellaSwag-style, multiple_choice): a few lines of context, then four candidate next
  lines: the true one and three drawn from other held-out documents; acc and acc_norm (length-normalised).
- quill_perplexity (wikitext-style, loglikelihood_rolling): every test document whole; word perplexity,
  byte perplexity and bits per byte. With the same window stride it reproduces the held-out test_bpb.

Evaluation items come from the test split; few-shot examples from a different split (validation), so a
shot never shows the answer. Each task is a YAML file plus JSON-lines files, loaded by lm-eval through
the `json` dataset builder (no network). Same inputs, same seed: byte-identical files.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from pipelines.common.atomic import write_text

CLOZE_CONTEXT_WORDS = 40  # a cloze passage holds about this many words before the hidden one
NEXTLINE_CONTEXT_LINES = 3  # lines of context before the four candidate lines
MIN_LINE_WORDS = 4  # candidate lines and cloze lines are at least this long
FEWSHOT_POOL = 50  # few-shot examples built from the validation split, per task
WORD = re.compile(r"^(.*\S)\s+([A-Za-z][A-Za-z'-]*[A-Za-z])([^A-Za-z]*)$")  # line -> (head, last word, punct)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if len(line.split()) >= MIN_LINE_WORDS]


def cloze_items(texts: Sequence[str], max_items: int, rng: random.Random) -> list[dict]:
    """One passage per document (documents in a seeded order) until max_items: context + hidden last word."""
    order = list(range(len(texts)))
    rng.shuffle(order)
    items = []
    for d in order:
        lines = _lines(texts[d])
        ends = [i for i, line in enumerate(lines) if WORD.match(line) and len(WORD.match(line).group(2)) >= 3]
        if not ends:
            continue
        end = rng.choice(ends)
        head, word, _ = WORD.match(lines[end]).groups()
        passage = [head]
        start = end
        while start > 0 and sum(len(p.split()) for p in passage) < CLOZE_CONTEXT_WORDS:
            start -= 1
            passage.insert(0, lines[start])
        items.append({"doc": d, "context": "\n".join(passage), "target": " " + word})  # lm-eval: space in target
        if len(items) == max_items:
            break
    return items


def nextline_items(texts: Sequence[str], max_items: int, rng: random.Random) -> list[dict]:
    """Context lines + the true next line among three lines from other documents, in a seeded order."""
    per_doc = [_lines(t) for t in texts]
    order = [d for d in range(len(texts)) if len(per_doc[d]) > NEXTLINE_CONTEXT_LINES]
    rng.shuffle(order)
    others = [d for d in range(len(texts)) if per_doc[d]]
    items = []
    for d in order:
        lines = per_doc[d]
        k = rng.randrange(NEXTLINE_CONTEXT_LINES, len(lines))
        true = lines[k]
        distractors: list[str] = []
        for _ in range(100):  # rejection sampling; gives up on tiny corpora
            o = rng.choice(others)
            if o == d:
                continue
            line = rng.choice(per_doc[o])
            if line != true and line not in distractors:
                distractors.append(line)
            if len(distractors) == 3:
                break
        if len(distractors) < 3:
            continue
        choices = [true, *distractors]
        rng.shuffle(choices)
        items.append(
            {
                "doc": d,
                "context": "\n".join(lines[k - NEXTLINE_CONTEXT_LINES : k]),
                "choices": choices,
                "label": choices.index(true),
            }
        )
        if len(items) == max_items:
            break
    return items


def perplexity_items(texts: Sequence[str]) -> list[dict]:
    """Every document, whole and unaltered (so the rolling loglikelihood matches the token shards)."""
    return [{"doc": d, "text": t} for d, t in enumerate(texts)]


TASKS = {
    "quill_cloze": {
        "output_type": "loglikelihood",
        "doc_to_text": "context",
        "doc_to_target": "target",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    },
    "quill_nextline": {
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "\n",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    },
    "quill_perplexity": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
    },
}
PERPLEXITY_TASKS = {"quill_perplexity"}  # zero-shot only


def _jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)


def build_task_pack(
    test_texts: Sequence[str], fewshot_texts: Sequence[str], out_dir: Path, max_items: int, seed: int
) -> dict[str, int]:
    """Write <task>.yaml + <task>.{test,fewshot}.jsonl for each task into out_dir; return items per task.

    Paths inside the YAML files are `out_dir`-relative joins as given (relative when out_dir is relative),
    so the stage's files do not depend on where the repository is checked out.
    """
    out_dir = Path(out_dir)
    builders = {
        "quill_cloze": lambda texts, n, rng: cloze_items(texts, n, rng),
        "quill_nextline": lambda texts, n, rng: nextline_items(texts, n, rng),
        "quill_perplexity": lambda texts, n, rng: perplexity_items(texts),
    }
    counts = {}
    for name, spec in TASKS.items():
        test = builders[name](test_texts, max_items, random.Random(f"{seed}:{name}:test"))
        fewshot = builders[name](fewshot_texts, FEWSHOT_POOL, random.Random(f"{seed}:{name}:fewshot"))
        if not test:
            raise ValueError(f"{name}: the test split yields no items (documents too short?)")
        write_text(out_dir / f"{name}.test.jsonl", _jsonl(test))
        write_text(out_dir / f"{name}.fewshot.jsonl", _jsonl(fewshot or test[:1]))
        config = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {
                "data_files": {
                    "test": str(out_dir / f"{name}.test.jsonl"),
                    "fewshot": str(out_dir / f"{name}.fewshot.jsonl"),
                }
            },
            "test_split": "test",
            **({} if name in PERPLEXITY_TASKS else {"fewshot_split": "fewshot"}),
            **spec,
            "metadata": {"version": 1.0, "seed": seed},
        }
        write_text(out_dir / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        counts[name] = len(test)
    return counts
