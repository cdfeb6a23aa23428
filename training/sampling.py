"""Batched sampling for every neural rung.

All names advance together, one token per step; a finished name leaves the batch (its rows are dropped from the
key-value cache too), so later steps cost only what is still being written. The HookedTransformer path uses
TransformerLens's own key-value cache and its ordinary forward, so `fwd_hooks` (steering) fire at every step exactly
as they would in `run_with_hooks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from training.errors import VillesError
from training.lm import log_probs
from training.tokenizer import EOS_ID, CharTokenizer


@dataclass(frozen=True)
class SampleSettings:
    n: int = 20
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    prefix: str = ""
    batch_size: int = 10_000


@dataclass
class Samples:
    names: list[str]
    tokens: list[list[int]]  # <bos> prefix … <eos> (without <eos> if cut at the context length)
    step_log_probs: list[Float[Tensor, "steps vocab"]] | None = None  # next-token log-probs behind each choice


def check_sample_settings(s: SampleSettings, tokenizer: CharTokenizer, n_ctx: int | None) -> None:
    if s.n <= 0:
        raise VillesError(f"--n must be positive, got {s.n}")
    if not (isinstance(s.temperature, (int, float)) and math.isfinite(s.temperature) and s.temperature > 0):
        raise VillesError(f"temperature must be a positive number, got {s.temperature}")
    if s.top_k is not None and s.top_k <= 0:
        raise VillesError(f"top-k must be positive, got {s.top_k}")
    tokenizer.check(s.prefix, "prefix")
    if n_ctx is not None and len(s.prefix) + 1 >= n_ctx:
        raise VillesError(f"prefix of {len(s.prefix)} characters leaves no room in a context of {n_ctx} tokens")


def _choose(logits: Float[Tensor, "batch vocab"], s: SampleSettings, gen: torch.Generator):
    lp = log_probs(logits)
    scaled = lp / s.temperature
    if s.top_k is not None and s.top_k < scaled.shape[-1]:
        kth = scaled.topk(s.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1), lp


def _is_hooked(model) -> bool:
    from transformer_lens import HookedTransformer

    return isinstance(model, HookedTransformer)


@torch.no_grad()
def sample_names(
    model: torch.nn.Module,
    tokenizer: CharTokenizer,
    settings: SampleSettings = SampleSettings(),
    fwd_hooks: Sequence[tuple] = (),
    keep_log_probs: bool = False,
    max_len: int | None = None,
) -> Samples:
    n_ctx = model.cfg.n_ctx if _is_hooked(model) else None
    check_sample_settings(settings, tokenizer, n_ctx)
    max_tokens = n_ctx or (max_len or 64) + 2
    gen = torch.Generator().manual_seed(settings.seed)
    start = torch.tensor(tokenizer.encode_prefix(settings.prefix))
    names: list[str] = []
    all_tokens: list[list[int]] = []
    all_lps: list[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        if fwd_hooks and not n_ctx:
            raise VillesError("fwd_hooks need a HookedTransformer")
        for b0 in range(0, settings.n, settings.batch_size):
            batch = min(settings.batch_size, settings.n - b0)
            toks, lps = _generate(
                _backend(model, batch, fwd_hooks), start, batch, max_tokens, settings, gen, keep_log_probs
            )
            for i, t in enumerate(toks):
                all_tokens.append(t)
                names.append(tokenizer.decode(t[1:]))
                if keep_log_probs:
                    all_lps.append(lps[i])
    finally:
        model.train(was_training)
    return Samples(names, all_tokens, all_lps if keep_log_probs else None)


def _backend(model, batch: int, fwd_hooks):
    if not _is_hooked(model):
        return _Recompute(model)
    from training import lean_decoder

    if not fwd_hooks and lean_decoder.supports(model):
        return _Lean(model, batch)
    return _HookedCache(model, batch, fwd_hooks)


class _Recompute:
    """Any tokens -> logits module (the MLP): the whole prefix is run again at each step."""

    def __init__(self, model):
        self.model = model

    def first(self, tokens):
        self.tokens = tokens
        return self.model(tokens)[:, -1]

    def drop(self, live):
        self.tokens = self.tokens[live]

    def next(self, nxt):
        self.tokens = torch.cat([self.tokens, nxt[:, None]], dim=1)
        return self.model(self.tokens)[:, -1]


class _HookedCache:
    """TransformerLens's forward with its own key-value cache: every hook fires at every step."""

    def __init__(self, model, batch, fwd_hooks):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        self.model, self.fwd_hooks = model, list(fwd_hooks)
        self.cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)

    def _run(self, tokens):
        with self.model.hooks(fwd_hooks=self.fwd_hooks):
            return self.model(tokens, past_kv_cache=self.cache)[:, -1]

    def first(self, tokens):
        return self._run(tokens)

    def drop(self, live):
        for entry in self.cache.entries:
            entry.past_keys, entry.past_values = entry.past_keys[live], entry.past_values[live]
        self.cache.previous_attention_mask = self.cache.previous_attention_mask[live]

    def next(self, nxt):
        return self._run(nxt[:, None])


class _Lean:
    """The lean decoder. Finished rows stay in it (fed <eos>, outputs ignored) until fewer than 60% are live:
    compacting the cache at every finished name would copy it at almost every step."""

    def __init__(self, model, batch):
        from training.lean_decoder import LeanDecoder

        self.dec = LeanDecoder(model, batch)
        self.slots = torch.arange(batch)  # decoder row of each live sequence

    def first(self, tokens):
        return self.dec.step(tokens)

    def drop(self, live):
        self.slots = self.slots[live]
        if len(self.slots) < 0.6 * self.dec.batch:
            self.dec.keep(self.slots)
            self.slots = torch.arange(len(self.slots))

    def next(self, nxt):
        feed = torch.full((self.dec.batch, 1), EOS_ID)
        feed[self.slots, 0] = nxt
        return self.dec.step(feed)[self.slots]


def _generate(backend, start, batch, max_tokens, s, gen, keep):
    """The one sampling loop: all rows advance together; a row leaves when it writes <eos> or fills the context."""
    tokens = start.repeat(batch, 1)
    rows = torch.arange(batch)  # original row of each live sequence
    out_tokens: list = [None] * batch
    out_lps: list = [None] * batch
    lps: list[Tensor] = []  # per step, [live, vocab]; re-indexed when rows leave
    logits = backend.first(tokens)
    while True:
        nxt, lp = _choose(logits, s, gen)
        if keep:
            lps.append(lp)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done = (nxt == EOS_ID) | (tokens.shape[1] >= max_tokens)
        for j in torch.nonzero(done).flatten().tolist():
            out_tokens[int(rows[j])] = tokens[j].tolist()
            if keep:
                out_lps[int(rows[j])] = torch.stack([lp[j] for lp in lps])
        if done.any():
            live = ~done
            if not live.any():
                return out_tokens, out_lps
            tokens, rows, nxt = tokens[live], rows[live], nxt[live]
            lps = [lp[live] for lp in lps]
            backend.drop(live)
        logits = backend.next(nxt)
