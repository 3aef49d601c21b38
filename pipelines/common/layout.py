"""Every file and folder the stages read and write: the one declaration, relative to a project root.

dvc.yaml wires the same paths between stages; `STAGE_IO` says which of them each stage reads and writes, and
tests/unit/pipelines/common/test_layout.py checks it against every stage's deps and outs. A stage gets a `Layout`
from its runner (pipelines/common/runner.py): the project's own with no options, another root with `--root DIR`.

    >>> Layout().clean
    PosixPath('data/clean')
    >>> Layout().under("/srv/corpus").eval_metrics
    PosixPath('/srv/corpus/metrics/eval.json')
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Where a project's inputs and outputs lie; the defaults are relative to the project root."""

    root: Path = Path(".")  # what `under` moved the rest to; relative local sources start here
    params: Path = Path("params.yaml")
    dvc_lock: Path = Path("dvc.lock")  # read for lineage: the hashes DVC recorded for a stage's inputs
    # data stages
    raw: Path = Path("data/raw")  # ingest: the sources' files as fetched, and manifest.json
    clean: Path = Path("data/clean")  # clean: {train,val,test}.jsonl
    clean_reports: Path = Path("reports/clean")
    clean_metrics: Path = Path("metrics/clean.json")
    tokenizer: Path = Path("data/tokenizer")  # tokenize: tokenizer.json and its Hugging Face files
    tokens: Path = Path("data/tokens")  # tokenize: {train,val,test}.bin and meta.json
    tokenize_metrics: Path = Path("metrics/tokenize.json")
    # model stages
    checkpoints: Path = Path("checkpoints")  # train: resumable checkpoints, kept across runs
    model: Path = Path("artifacts/model")  # train: the Hugging Face folder every later stage and the server read
    train_metrics: Path = Path("metrics/train.json")
    train_plots: Path = Path("plots/train")
    eval_reports: Path = Path("reports/eval")  # evaluate: report.md, samples.json, evaluated.json, task packs
    eval_metrics: Path = Path("metrics/eval.json")
    eval_plots: Path = Path("plots/eval")
    registered: Path = Path("artifacts/registered.json")  # register: the version and the promotion decision
    # fine-tuning stages
    chat: Path = Path("data/chat")  # chat_data: {train,val,test}.jsonl, a conversation ({"messages": [...]}) a line
    chat_reports: Path = Path("reports/chat")
    chat_metrics: Path = Path("metrics/chat.json")
    # finetune: the chat model (a plain Hugging Face folder, LoRA merged in, ChatML chat_template in its tokenizer
    # files), peft's adapter files alone (method lora; a README saying there is none for method full), resumable
    # checkpoints beside the train stage's (DVC refuses an output inside another stage's `checkpoints`)
    chat_model: Path = Path("artifacts/chat_model")
    chat_adapter: Path = Path("artifacts/chat_adapter")
    finetune_checkpoints: Path = Path("checkpoints_finetune")
    finetune_metrics: Path = Path("metrics/finetune.json")
    finetune_plots: Path = Path("plots/finetune")
    # chat_eval: report.md, samples.json (both models' responses), evaluated.json (which chat model, base and test
    # conversations the metrics describe); metrics: response bits per byte, end-of-turn rate, tasks, for both
    chat_eval_reports: Path = Path("reports/chat_eval")
    chat_eval_metrics: Path = Path("metrics/chat_eval.json")
    chat_registered: Path = Path("artifacts/chat_registered.json")  # chat_register: as registered.json

    @property
    def eval_samples(self) -> Path:
        return self.eval_reports / "samples.json"

    @property
    def chat_samples(self) -> Path:
        return self.chat_eval_reports / "samples.json"

    @property
    def chat_evaluated(self) -> Path:
        return self.chat_eval_reports / "evaluated.json"

    @property
    def evaluated(self) -> Path:
        """Which model, tokenizer and test data metrics/eval.json describes (kept out of `dvc metrics diff`)."""
        return self.eval_reports / "evaluated.json"

    def under(self, root: str | Path) -> Layout:
        """The same layout under another project root."""
        moved = {f.name: Path(root) / getattr(self, f.name) for f in fields(self) if f.name != "root"}
        return replace(self, root=Path(root), **moved)

    def key(self, path: Path) -> str:
        """A path as dvc.lock names it: relative to the project root."""
        return str(path.relative_to(self.root))


# What each stage reads and writes (Layout field names): the data dependencies of dvc.yaml, without the code.
STAGE_IO: dict[str, dict[str, tuple[str, ...]]] = {
    "ingest": {"reads": (), "writes": ("raw",)},
    "clean": {"reads": ("raw",), "writes": ("clean", "clean_reports", "clean_metrics")},
    "tokenize": {"reads": ("clean",), "writes": ("tokenizer", "tokens", "tokenize_metrics")},
    "train": {"reads": ("tokens", "tokenizer"), "writes": ("model", "checkpoints", "train_plots", "train_metrics")},
    "evaluate": {"reads": ("model", "clean", "tokens"), "writes": ("eval_reports", "eval_metrics", "eval_plots")},
    "register": {
        "reads": ("model", "eval_metrics", "eval_samples", "evaluated", "clean"),
        "writes": ("registered",),
    },
    "chat_data": {"reads": ("raw",), "writes": ("chat", "chat_reports", "chat_metrics")},
    "finetune": {
        "reads": ("chat", "model"),
        "writes": ("chat_model", "chat_adapter", "finetune_checkpoints", "finetune_plots", "finetune_metrics"),
    },
    # chat_eval: data/clean holds the task pack's items; model is the default base (finetune.base)
    "chat_eval": {
        "reads": ("chat", "chat_model", "model", "clean", "eval_metrics", "evaluated"),
        "writes": ("chat_eval_reports", "chat_eval_metrics"),
    },
    "chat_register": {
        "reads": ("chat_model", "chat_eval_metrics", "chat_eval_reports", "chat"),
        "writes": ("chat_registered",),
    },
}

PROJECT = Layout()  # the project's own layout, relative to the folder a stage runs in
