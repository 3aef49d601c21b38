"""quill's model: a Llama-layout GPT, its generation engine and Hugging Face folder I/O (pure PyTorch)."""

from model.config import PRESETS, GPTConfig
from model.engine import Engine
from model.hf import load_pretrained, save_pretrained
from model.sampling import SamplingParams
from model.scheduler import RowUpdate, Scheduler
from model.sequence import Completion, StreamChunk, TokenLogprob
from model.transformer import GPT, KVCache

__all__ = [
    "GPT",
    "GPTConfig",
    "PRESETS",
    "KVCache",
    "Engine",
    "SamplingParams",
    "Completion",
    "StreamChunk",
    "TokenLogprob",
    "save_pretrained",
    "load_pretrained",
    "Scheduler",
    "RowUpdate",
]
