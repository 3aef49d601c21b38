"""quill's model: a Llama-layout GPT, its generation engine and Hugging Face folder I/O."""

from model.config import PRESETS, GPTConfig
from model.generate import Completion, Engine, SamplingParams, StreamChunk, TokenLogprob
from model.hf import load_pretrained, save_pretrained
from model.transformer import GPT, KVCache

__all__ = [
    "GPT", "GPTConfig", "PRESETS", "KVCache", "Engine", "SamplingParams", "Completion", "StreamChunk",
    "TokenLogprob", "save_pretrained", "load_pretrained",
]
