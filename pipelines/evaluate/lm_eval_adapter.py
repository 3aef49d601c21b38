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

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from model import Engine, SamplingParams


def rolling_windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over targets t[0..n) of x = [prefix] + t, as (input_start, input_end, n_scored) in x's indices.

    The window feeds x[input_start:input_end] and scores its last n_scored predictions (targets
    t[input_end - n_scored .. input_end)); every target is scored exactly once.

        >>> rolling_windows(10, block_size=4, stride=2)
        [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    """
    if n <= 0:
        return []
    stride = min(stride, block_size)
    out, b = [], min(n, block_size)
    out.append((0, b, b))
    while b < n:
        a, b = b, min(n, b + stride)
        out.append((b - block_size, b, b - a))
    return out


@torch.inference_mode()
def rolling_loglikelihood(
    model, docs: Sequence[Sequence[int]], prefix_id: int, stride: int | None = None, batch_size: int = 16,
    desc: str | None = None,
) -> list[float]:
    """Sum of log p(t_i | preceding tokens) over each document, with sliding windows (natural log).

    Windows from all documents are sorted by length and run `batch_size` at a time (right padding never
    changes earlier positions in a causal model).
    """
    block_size = model.config.block_size
    stride = stride or block_size
    device = next(model.parameters()).device
    jobs = []  # (doc index, x, start, end, n_scored)
    xs = [[prefix_id, *map(int, d)] for d in docs]
    for i, x in enumerate(xs):
        for start, end, n_scored in rolling_windows(len(x) - 1, block_size, stride):
            jobs.append((i, start, end, n_scored))
    jobs.sort(key=lambda j: j[1] - j[2])  # longest windows first: fewer padded positions per batch
    sums = [0.0] * len(docs)
    for s in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=desc is None, unit="batch", mininterval=2):
        chunk = jobs[s : s + batch_size]
        T = max(end - start for _, start, end, _ in chunk)
        idx = torch.zeros(len(chunk), T, dtype=torch.long)
        tgt = torch.full((len(chunk), T), -100, dtype=torch.long)  # -100: not scored
        for r, (i, start, end, n_scored) in enumerate(chunk):
            x = xs[i]
            idx[r, : end - start] = torch.tensor(x[start:end])
            tgt[r, end - start - n_scored : end - start] = torch.tensor(x[end - n_scored + 1 : end + 1])
        hidden = model.hidden_states(idx.to(device))
        tgt = tgt.to(device)
        scored = tgt != -100
        # the output head only at scored positions: windows after a document's first overlap their predecessor
        nll = F.cross_entropy(model.logits(hidden[scored]), tgt[scored], reduction="none")
        rows = scored.nonzero()[:, 0]
        per_row = torch.zeros(len(chunk), device=device, dtype=nll.dtype).index_add_(0, rows, nll)
        for r, row in enumerate(per_row.tolist()):
            sums[chunk[r][0]] -= row
    return sums


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

    def __init__(self, pretrained: str | None = None, engine: Engine | None = None, batch_size: int | str = 16,
                 stride: int | str | None = None, max_gen_toks: int | str = 64, device: str | None = None,
                 rolling_cache: dict | None = None, **_):
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
            warnings.warn(f"{len(cut)} of {len(requests)} loglikelihood requests ({sum(cut) / len(cut):.0f} tokens on average) "
                          f"exceed the model's context of {self.max_length} + 1 tokens and lose their start, as in lm-eval's "
                          "Hugging Face model; fewer few-shot examples (eval.num_fewshot) or a longer model.block_size avoid it",
                          stacklevel=2)
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
            computed = rolling_loglikelihood(self.model, todo, self.eot_token_id, self.stride, self.batch_size,
                                             desc=None if disable_tqdm else "loglikelihood_rolling")
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
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature if do_sample or temperature else 0.0,
                                    top_p=float(kwargs.pop("top_p", 1.0) or 1.0), top_k=int(kwargs.pop("top_k", 0) or 0),
                                    stop=until or None, seed=kwargs.pop("seed", None))
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


def perplexity_summary(logliks: Sequence[float], n_tokens: int, n_bytes: int) -> dict:
    """loss (nats/token), ppl and bits per byte from summed log-likelihoods."""
    total = -float(sum(logliks))
    loss = total / max(n_tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700)), "bpb": total / math.log(2) / max(n_bytes, 1)}
