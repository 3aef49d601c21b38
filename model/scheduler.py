"""Continuous batching: requests with their own sampling parameters share every decode step, joining and
leaving at step boundaries, so a short request never waits for a long one to finish.

    >>> sched = Scheduler(engine, max_batch_size=16)
    >>> rid = sched.add(engine.encode("To be"), SamplingParams(max_tokens=32, temperature=0.7, seed=1))
    >>> while sched.has_work():
    ...     for u in sched.step():          # a token for every running request (two for one just admitted)
    ...         print(u.rid, u.chunk.text, u.completion)   # completion is set on a request's last update

One request is one row (n > 1 is n requests). `add` and `cancel` may be called from another thread than
`step` (a server's event loop while the step runs in a worker thread); `step` itself is not reentrant.

KV-cache layout: one KVCache of max_batch_size rows. Running rows are packed into cache rows [0, N) and
right-aligned: row r's tokens fill columns [pos - len_r, pos). A decode step feeds every row's last token at
the shared column `pos` (where GPT.forward writes), and per-row position_ids plus an attention mask over the
columns give each row its own positions; attention reads only from the longest row's first column on. New
requests are prefilled together on their own batch (left padding, which is right-aligned too) in the engine's
scratch cache and copied into free rows; a step prefills at most max_prefill_tokens (padded) so a burst of
long prompts cannot stall the running rows for long. The window moves left when `pos` reaches block_size
(there is always room: a running row holds at most block_size - 1 tokens) and right when a new prompt is
longer than `pos`.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import deque
from dataclasses import dataclass

import torch

from model.engine import Engine
from model.sampler import SamplingRows, sample
from model.sampling import SamplingParams, apply_penalties, check_param, penalty_state
from model.sequence import Completion, Row, StreamChunk, TokenLogprob
from model.transformer import KVCache


@dataclass
class RowUpdate:
    """What one step did for one request."""

    rid: int
    chunk: StreamChunk  # the new token and the text that became final with it
    completion: Completion | None = None  # set on the request's last update


@dataclass
class _Request:
    rid: int
    row: Row
    rng: random.Random | None  # seeded rows only; unseeded rows share the scheduler's stream
    seen: torch.Tensor | None = None  # (1, V) penalty state, as model.sampling.penalty_state makes it
    counts: torch.Tensor | None = None
    history: list[list[int]] | None = None
    length: int = 0  # tokens of this row in the KV cache


class Scheduler:
    """Admits waiting requests into free KV-cache rows at every step, decodes all running rows together,
    retires finished or cancelled ones at once.

    static=True admits only into an empty batch, so a batch runs to completion (what `@serve.batch` does):
    the baseline the serving benchmark compares against.
    """

    def __init__(
        self, engine: Engine, max_batch_size: int, static: bool = False, max_prefill_tokens: int | None = None
    ):
        check_param(max_batch_size >= 1, "max_batch_size", "an integer >= 1", max_batch_size)
        self.engine, self.max_batch_size, self.static = engine, max_batch_size, static
        # padded prompt tokens prefilled in one step (at least one request is always admitted)
        self.max_prefill_tokens = max_prefill_tokens or engine.config.block_size
        self.device = engine.device
        self._rng = random.Random()  # unseeded rows' uniforms (seeded from the OS)
        dtype = next(engine.model.parameters()).dtype
        with torch.inference_mode():  # like the engine's prefill cache: torch.compile then traces both alike
            self.cache = KVCache(engine.config, max_batch_size, device=self.device, dtype=dtype)
        self.pos = 0  # columns in use: every running row ends at pos - 1
        self.running: list[_Request] = []  # index i lives in cache row i
        self._waiting: deque[_Request] = deque()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()  # guards _waiting and _cancelled (add/cancel come from other threads)
        self._ids = itertools.count()

    # -- what callers use ------------------------------------------------------------------------
    def add(self, prompt, params: SamplingParams) -> int:
        """Queue a request (a prompt string or token ids, n=1); returns its id. Raises ValueError if it
        cannot run (token ids outside the vocabulary, prompt + max_tokens beyond the context, beam search)."""
        check_param(params.n == 1, "n", "1 per scheduler request (submit n requests)", params.n)
        check_param(params.num_beams == 1, "num_beams", "1 with continuous batching", params.num_beams)
        ids = self.engine.prompt_ids_of(prompt)
        V = self.engine.config.vocab_size
        check_param(all(t < V for t in params.logit_bias), "logit_bias", f"keyed by token ids < {V}", params.logit_bias)
        self.engine.check_fits([ids], params)
        rid = next(self._ids)
        row = Row(rid, ids, params, self.engine.stop_ids(params), self.engine.decode, incremental=True)
        # its own stream: same seed, same tokens (what Engine.generate draws for that seed and prompt)
        rng = random.Random(params.seed) if not params.greedy and params.seed is not None else None
        seen, counts, history = penalty_state(params, [(ids, ())], self.engine.config.vocab_size, self.device)
        with self._lock:
            self._waiting.append(_Request(rid, row, rng, seen, counts, history))
        return rid

    def cancel(self, rid: int) -> None:
        """Drop a request (client gone): it leaves the queue, or frees its cache row at the next step."""
        with self._lock:
            self._cancelled.add(rid)

    def reset(self) -> None:
        """Drop every running and waiting request (after a step failed half-way): the cache rows are free again.
        Request ids keep counting, so an id from before never names a request from after."""
        with self._lock:
            self._waiting.clear()
            self._cancelled.clear()
        self.running.clear()
        self.pos = 0

    def has_work(self) -> bool:
        return bool(self.running or self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @torch.inference_mode()
    def step(self) -> list[RowUpdate]:
        """Retire cancelled rows, admit and prefill waiting requests into free rows (each gets its first
        token), then decode one token for every running row, the ones just admitted too: a new request does
        not wait a whole decode step for its first token. Returns the updates in order (a request admitted in
        this step may have two)."""
        self._drop_cancelled()
        updates = self._admit()
        if self.running:
            updates += self._decode()
        return updates

    # -- internals -------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        with self._lock:
            gone, self._cancelled = self._cancelled, set()
            if gone:
                self._waiting = deque(r for r in self._waiting if r.rid not in gone)
        for i in reversed(range(len(self.running))):
            if self.running[i].rid in gone:
                self._retire(i)

    def _decode(self) -> list[RowUpdate]:
        N, longest = len(self.running), max(r.length for r in self.running)
        if self.pos == self.cache.block_size:  # slide the window left past columns no row uses any more
            self._shift(longest - self.pos)
        lengths = torch.tensor([r.length for r in self.running], device=self.device)
        idx = torch.tensor([[r.row.ids[-1]] for r in self.running], device=self.device)  # (N, 1)
        cols = torch.arange(self.pos + 1, device=self.device)[None, :]
        mask = cols >= (self.pos - lengths)[:, None]  # (N, pos + 1): the row's own columns and the new one
        self.cache.pos = self.pos
        self.cache.first = self.pos - longest  # attention skips the columns no row uses
        logits, _ = self.engine.forward(
            idx, position_ids=lengths[:, None], attention_mask=mask, kv_cache=self.cache, logits_to_keep=1
        )
        self.pos += 1
        for r in self.running:
            r.length += 1
        updates = self._sample(self.running, logits[:, -1])
        for i in reversed(range(N)):
            if self.running[i].row.finish_reason:
                self._retire(i)
        return updates

    def _admit(self) -> list[RowUpdate]:
        if self.static and self.running:
            return []
        with self._lock:
            free = self.max_batch_size - len(self.running)
            new, L = [], 0
            while self._waiting and len(new) < free:
                n = max(L, len(self._waiting[0].row.prompt_ids))
                if new and n * (len(new) + 1) > self.max_prefill_tokens:
                    break  # the rest waits for the next step
                new.append(self._waiting.popleft())
                L = n
        if not new:
            return []
        prompts = [r.row.prompt_ids for r in new]
        echo = any(r.row.params.echo for r in new)
        logits, idx, _, _, scratch = self.engine.prefill(prompts, L, want_all_logits=echo)
        if echo:
            n_top = max(r.row.params.logprobs or 0 for r in new)
            recs = self.engine.prompt_logprobs(logits, idx, [len(p) for p in prompts], n_top)
            for r, rec in zip(new, recs):
                if r.row.params.echo:
                    r.row.prompt_logprobs = [_keep_top(x, r.row.params.logprobs or 0) for x in rec]
        updates = []
        joining = []
        for r in new:
            if r.row.params.max_tokens == 0:  # prompt scoring only (echo): done after the prefill
                r.row.finish_reason = "length"
                updates.append(RowUpdate(r.rid, StreamChunk(None, "", "length"), r.row.completion()))
            else:
                joining.append(r)
        if not joining:
            return updates
        rows = [new.index(r) for r in joining]
        if self.running and L > self.pos:
            self._shift(L - self.pos)
        self.pos = max(self.pos, L)
        for b, r in zip(rows, joining):  # copy the prefilled keys/values in, right-aligned at pos
            dst, n = len(self.running), len(r.row.prompt_ids)
            for src_t, dst_t in zip(scratch.k + scratch.v, self.cache.k + self.cache.v):
                dst_t[dst, :, self.pos - n : self.pos] = src_t[b, :, L - n : L]
            r.length = n
            self.running.append(r)
        rows_t = torch.tensor(rows, device=self.device)
        updates += self._sample(joining, logits.index_select(0, rows_t)[:, -1])
        for i in reversed(range(len(self.running))):
            if self.running[i].row.finish_reason:
                self._retire(i)
        return updates

    def _sample(self, reqs: list[_Request], last: torch.Tensor) -> list[RowUpdate]:
        """One token per request from its row of last (N, V), each with its own parameters.

        Batched where rows allow it: penalties are applied row by row (only rows that have them), then all sampled
        rows draw together (model/sampler.py), each with one uniform from its own stream per draw: a seeded row's
        own, so it draws what `Engine.generate` draws with that seed, whatever else is in the batch.
        """
        x = last
        for i, r in enumerate(reqs):
            if r.seen is not None or r.counts is not None or r.history is not None or r.row.params.logit_bias:
                x = last.clone() if x is last else x
                x[i : i + 1] = apply_penalties(last[i : i + 1], r.row.params, r.seen, r.counts, r.history)
        sampled = [i for i, r in enumerate(reqs) if not r.row.params.greedy]
        if len(sampled) == len(reqs):
            nxt = self._draw(x, reqs)
        else:
            nxt = x.max(dim=-1).indices  # greedy rows keep this
            if sampled:
                sel = torch.tensor(sampled, device=self.device)
                nxt[sel] = self._draw(x.index_select(0, sel), [reqs[i] for i in sampled])
        want = [i for i, r in enumerate(reqs) if r.row.params.logprobs is not None]
        recs: dict[int, TokenLogprob] = {}
        if want:
            w = torch.tensor(want, device=self.device)
            n_top = max(reqs[i].row.params.logprobs for i in want)
            got = self.engine.logprob_records(torch.log_softmax(last.index_select(0, w), dim=-1), nxt[w], n_top)
            recs = {i: _keep_top(rec, reqs[i].row.params.logprobs) for i, rec in zip(want, got)}
        updates = []
        for i, (r, tok) in enumerate(zip(reqs, nxt.tolist())):
            if r.seen is not None:
                r.seen[0, tok] = True
            if r.counts is not None:
                r.counts[0, tok] += 1
            if r.history is not None:
                r.history[0].append(tok)
            row = r.row
            row.append(tok, recs.get(i))
            final = row.final_text()
            chunk = StreamChunk(tok, final[row.emitted :], row.finish_reason, recs.get(i))
            row.emitted = len(final)
            updates.append(RowUpdate(r.rid, chunk, row.completion() if row.finish_reason else None))
        return updates

    def _draw(self, x: torch.Tensor, reqs: list[_Request]) -> torch.Tensor:
        """A token for each sampled request (a row of x), drawn with uniforms from the request's own stream."""
        streams = [r.rng or self._rng for r in reqs]
        controls = SamplingRows.of([r.row.params for r in reqs], self.device)
        return sample(x, controls, lambda idx: [streams[k].random() for k in idx])

    def _retire(self, i: int) -> None:
        """Free cache row i: the last running row moves into it, so running rows stay packed in [0, N)."""
        last = self.running.pop()
        if i < len(self.running):
            src, lo = len(self.running), self.pos - last.length  # only its own columns: the rest are masked
            for t in self.cache.k + self.cache.v:
                t[i, :, lo : self.pos] = t[src, :, lo : self.pos]
            self.running[i] = last
        if not self.running:
            self.pos = 0

    def _shift(self, d: int) -> None:
        """Move every running row's columns by d (negative = left); the rows stay right-aligned at pos."""
        N, p = len(self.running), self.pos
        lo = p - max(r.length for r in self.running)  # columns before lo hold no running row's tokens
        for t in self.cache.k + self.cache.v:
            t[:N, :, lo + d : p + d] = t[:N, :, lo:p].clone()
        self.pos = p + d


def _keep_top(rec: TokenLogprob, n: int) -> TokenLogprob:
    """A record with at most n alternatives (rows in one batch may ask for different numbers)."""
    return rec if len(rec.top) <= n else TokenLogprob(rec.token_id, rec.token, rec.logprob, rec.top[:n])
