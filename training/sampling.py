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
from jaxtyping import Float, Int
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
        for b0 in range(0, settings.n, settings.batch_size):
            batch = min(settings.batch_size, settings.n - b0)
            run = _run_plain
            if n_ctx:
                from training import lean_decoder

                run = _run_lean if not fwd_hooks and lean_decoder.supports(model) else _run_hooked
            toks, lps = run(model, start, batch, max_tokens, settings, gen, fwd_hooks, keep_log_probs)
            for i, t in enumerate(toks):
                all_tokens.append(t)
                names.append(tokenizer.decode(t[1:]))
                if keep_log_probs:
                    all_lps.append(lps[i])
    finally:
        model.train(was_training)
    return Samples(names, all_tokens, all_lps if keep_log_probs else None)


def _finish(
    tokens: Int[Tensor, "batch pos"], lps: list, rows: Tensor, out_tokens: list, out_lps: list, keep: bool, done
):
    for j in torch.nonzero(done).flatten().tolist():
        r = int(rows[j])
        out_tokens[r] = tokens[j].tolist()
        if keep:
            out_lps[r] = torch.stack([lp[j] for lp in lps])


def _run_hooked(model, start, batch, max_tokens, s, gen, fwd_hooks, keep):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)
    tokens = start.repeat(batch, 1)
    rows = torch.arange(batch)  # original row of each live sequence
    out_tokens: list = [None] * batch
    out_lps: list = [None] * batch
    lps: list[Tensor] = []  # per step, [live, vocab]; re-indexed when rows leave
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        logits = model(tokens, past_kv_cache=cache)[:, -1]
        while True:
            nxt, lp = _choose(logits, s, gen)
            if keep:
                lps.append(lp)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done = (nxt == EOS_ID) | (tokens.shape[1] >= max_tokens)
            if done.any():
                _finish(tokens, lps, rows, out_tokens, out_lps, keep, done)
                live = ~done
                if not live.any():
                    break
                tokens, rows, nxt = tokens[live], rows[live], nxt[live]
                lps = [lp[live] for lp in lps]
                for entry in cache.entries:
                    entry.past_keys, entry.past_values = entry.past_keys[live], entry.past_values[live]
                cache.previous_attention_mask = cache.previous_attention_mask[live]
            logits = model(nxt[:, None], past_kv_cache=cache)[:, -1]
    return out_tokens, out_lps


def _run_lean(model, start, batch, max_tokens, s, gen, fwd_hooks, keep):
    """Finished rows stay in the decoder (fed <eos>, outputs ignored) until fewer than 60% are live: compacting the
    cache at every finished name would copy it at almost every step."""
    from training.lean_decoder import LeanDecoder

    dec = LeanDecoder(model, batch)
    tokens = start.repeat(batch, 1)
    rows = torch.arange(batch)  # original row of each live sequence
    slots = torch.arange(batch)  # its row in the decoder
    out_tokens: list = [None] * batch
    out_lps: list = [None] * batch
    lps: list[Tensor] = []
    logits = dec.step(tokens)
    while True:
        nxt, lp = _choose(logits[slots], s, gen)
        if keep:
            lps.append(lp)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done = (nxt == EOS_ID) | (tokens.shape[1] >= max_tokens)
        if done.any():
            _finish(tokens, lps, rows, out_tokens, out_lps, keep, done)
            live = ~done
            if not live.any():
                break
            tokens, rows, nxt, slots = tokens[live], rows[live], nxt[live], slots[live]
            lps = [lp[live] for lp in lps]
            if len(slots) < 0.6 * dec.batch:
                dec.keep(slots)
                slots = torch.arange(len(slots))
        feed = torch.full((dec.batch, 1), EOS_ID)
        feed[slots, 0] = nxt
        logits = dec.step(feed)
    return out_tokens, out_lps


def _run_plain(model, start, batch, max_tokens, s, gen, fwd_hooks, keep):
    if fwd_hooks:
        raise VillesError("fwd_hooks need a HookedTransformer")
    tokens = start.repeat(batch, 1)
    rows = torch.arange(batch)
    out_tokens: list = [None] * batch
    out_lps: list = [None] * batch
    lps: list[Tensor] = []
    while True:
        nxt, lp = _choose(model(tokens)[:, -1], s, gen)
        if keep:
            lps.append(lp)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done = (nxt == EOS_ID) | (tokens.shape[1] >= max_tokens)
        if done.any():
            _finish(tokens, lps, rows, out_tokens, out_lps, keep, done)
            live = ~done
            if not live.any():
                break
            tokens, rows = tokens[live], rows[live]
            lps = [lp[live] for lp in lps]
    return out_tokens, out_lps
