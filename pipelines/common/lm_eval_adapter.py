"""quill models inside EleutherAI's lm-evaluation-harness, and the sliding-window scoring both use.

    >>> lm = QuillLM(engine=Engine.from_pretrained("artifacts/model"), batch_size=16)
    >>> lm_eval.simple_evaluate(model=lm, tasks=["quill_cloze"], task_manager=TaskManager(include_path=...))

or from the command line, once this module is imported, `--model quill --model_args pretrained=artifacts/model`.

All three request types are batched: `loglikelihood` goes through `Engine.loglikelihood` (sorted by length,
right-padded), `loglikelihood_rolling` through `rolling_loglikelihood` below (the same function the evaluate
stage uses for the held-out metrics, so the perplexity task and `test_bpb` agree by construction), and
`generate_until` through `Engine.generate` (requests with the same generation settings share a batch).

Sliding windows: a document t[0..n) is scored given a prefix token p (end-of-text). The first window
predicts t[0..min(n, T)) from [p, t0, ...]; each next window predicts the next `stride` tokens with the
preceding T - stride tokens as context (T = block_size). stride = T gives lm-eval's disjoint windows;
a smaller stride gives every prediction more context at the cost of T/stride forward passes per T tokens.
"""

from __future__ import annotations

import warnings

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from model import Engine, SamplingParams
from model.scoring import rolling_loglikelihood
from pipelines.common.progress import progress_bar


def split_documents(tokens, eot_id: int) -> list[list[int]]:
    """A flat token array (each document followed by eot_id) as a list of documents."""
    t = torch.as_tensor(tokens.astype("int64") if hasattr(tokens, "astype") else tokens)
    ends = (t == eot_id).nonzero().flatten().tolist()
    docs, start = [], 0
    for e in ends:
        docs.append(t[start:e].tolist())
        start = e + 1
    if start < len(t):
        docs.append(t[start:].tolist())
    return docs


def usable_device(device: str | None) -> str | None:
    """lm-eval's command line asks for `cuda` by default; without a GPU that means the CPU (as for its HF model)."""
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device {device!r} requested but no GPU is available: using the CPU", stacklevel=2)
        return "cpu"
    return device


@register_model("quill")
class QuillLM(TemplateLM):
    """An lm-eval model over a quill generation engine (one process, one device)."""

    def __init__(
        self,
        pretrained: str | None = None,
        engine: Engine | None = None,
        batch_size: int | str = 16,
        stride: int | str | None = None,
        max_gen_toks: int | str = 64,
        device: str | None = None,
        rolling_cache: dict | None = None,
        **_,
    ):
        super().__init__()
        if engine is None:
            if pretrained is None:
                raise ValueError("QuillLM needs pretrained=<model folder> or an engine")
            engine = Engine.from_pretrained(pretrained, device=usable_device(device))
        self.engine = engine
        self.model = engine.model
        self.batch_size = int(batch_size)
        self.stride = int(stride) if stride not in (None, "", "None") else None
        self.max_gen_toks = int(max_gen_toks)
        # {tuple(token ids): log-likelihood} computed with this model and stride (evaluate fills it from the
        # held-out pass, so the perplexity task does not score the same documents twice)
        self.rolling_cache = rolling_cache if rolling_cache is not None else {}
        self.loglikelihood_requests = self.truncated_requests = 0  # counted for the evaluate stage's log
        if engine.eos_token_id is None:
            raise ValueError("the model's tokenizer has no end-of-text token; lm-eval needs one as prefix")

    # -- what lm-eval asks of a model -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.engine.eos_token_id

    @property
    def max_length(self) -> int:
        return self.engine.config.block_size

    @property
    def device(self):
        return self.engine.device

    @property
    def tokenizer_name(self) -> str:
        return "quill"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.engine.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.engine.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(context, continuation) token pairs, left-truncated to the context window like HFLM."""
        limit = self.max_length + 1
        pairs, cut = [], []
        for _, ctx, cont in requests:
            if len(ctx) + len(cont) > limit:
                cut.append(len(ctx) + len(cont))
            cont = list(cont)[-self.max_length :]
            ctx = list(ctx)[-(limit - len(cont)) :] if len(ctx) + len(cont) > limit else list(ctx)
            if not ctx:  # the continuation filled the window: condition on its first token
                ctx, cont = cont[:1], cont[1:]
            pairs.append((ctx, cont))
        self.loglikelihood_requests += len(requests)
        self.truncated_requests += len(cut)
        if cut:  # what HFLM does per request, said once: few-shot scores mean less when the prompts are cut
            warnings.warn(
                f"{len(cut)} of {len(requests)} loglikelihood requests ({sum(cut) / len(cut):.0f} tokens on average) "
                f"exceed the model's context of {self.max_length} + 1 tokens and lose their start, as in lm-eval's "
                "Hugging Face model; fewer few-shot examples (eval.num_fewshot) or a longer model.block_size avoid it",
                stacklevel=2,
            )
        scored = [i for i, (_, cont) in enumerate(pairs) if cont]  # an empty continuation has probability 1
        results: list[tuple[float, bool]] = []
        group = self.batch_size * 8  # Engine.loglikelihood sorts within a group; groups give a progress bar
        for s in tqdm(range(0, len(scored), group), desc="loglikelihood", disable=disable_tqdm, unit="group"):
            results += self.engine.loglikelihood([pairs[i] for i in scored[s : s + group]], batch_size=self.batch_size)
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for i, result in zip(scored, results):
            out[i] = result
        for req, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req[0], result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [tuple(self.tok_encode(req.args[0])) for req in requests]
        todo = sorted({d for d in docs if d not in self.rolling_cache})
        if todo:
            computed = rolling_loglikelihood(
                self.model,
                todo,
                self.eot_token_id,
                self.stride,
                self.batch_size,
                progress=progress_bar(None if disable_tqdm else "loglikelihood_rolling"),
            )
            self.rolling_cache.update(zip(todo, computed))
        out = [self.rolling_cache[d] for d in docs]
        for req, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, result)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless gen_kwargs say otherwise) generation up to the stop strings; batched per settings."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            max_tokens = min(max_tokens, self.max_length - 1)
            do_sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature if do_sample or temperature else 0.0,
                top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                top_k=int(kwargs.pop("top_k", 0) or 0),
                stop=until or None,
                seed=kwargs.pop("seed", None),
            )
            keep = self.max_length - max_tokens
            for s in range(0, len(indices), self.batch_size):
                chunk = indices[s : s + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-keep:] for i in chunk]
                for i, completion in zip(chunk, self.engine.generate(prompts, params)):
                    out[i] = completion.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, completion.text)
                bar.update(len(chunk))
        bar.close()
        return out
