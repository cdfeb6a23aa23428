"""Feature and neuron dashboards: one static page per unit, an index, and a Neuronpedia-style JSON export.

`dashboards(model, sae=None, hook=None, out=...)` takes any HookedTransformer with a villes character tokenizer and
any SAELens SAE. It collects an `ActivationStore` (interp.activations), measures each unit's causal effects, and
writes a folder that works offline:

    index.html                   sortable, searchable table of every unit
    units/<set>/<index>.html     one page per unit (data inline; about 10-20 kB)
    assets/                      plotly.min.js (written once, never inlined), dashboard.js, dashboard.css
    dashboards.json              manifest: model, sets, settings, timings
    neuronpedia/<set>/<i>.json   with export="neuronpedia": the fields Neuronpedia / SAE-Dashboard read

The folder is built beside `out` and swapped in whole, so a failure or a kill never leaves a half-written one.

Causal panels, batched over all units of a set:
  - ablation, on the unit's `n_effect` top names: the unit is zero-ablated at every character of the name (the
    positions the statistics cover, see interp.activations) and each symbol's log-probability is compared with the
    clean run: the per-character panel shows log p(clean) - log p(ablated) on the symbol being predicted. The blocks
    before the hook's run once per distinct name (they cannot see the edit); the ablated run starts at the hook's
    block;
  - logit effect "through the rest of the model": at the unit's peak character, the change in logits from that same
    ablation, divided by the unit's activation there, averaged over the examples, then centred over the predictable
    symbols (softmax ignores a constant shift). The final LayerNorm (and every later block) is run for real on the
    ablated residual stream, so its per-token scale is the one the model actually uses, including how removing the
    unit changes that scale; nothing is frozen or folded. Beside it, the raw direct path: the unit's output direction
    times W_U (W_dec . W_U for a feature, W_out . W_U for a neuron), centred the same way, with no normalization;
  - generation: names sampled with the unit clamped at fixed multiples of its maximum activation at every position
    (<bos> included, so the first letter can move), with common random numbers: row s of every clamp value and of
    the unclamped baseline uses the same uniform draws, so differences come from the clamp, not from sampling noise.

Speed (bench/dashboards.py: the 2,048 features of the shipped SAE and its model's 1,024 MLP neurons over the whole
corpus). The activation pass prefetches the forward passes in a background thread and reads a TopK SAE's codes
straight from its top k; ablations reuse the clean activations the store kept (no SAE encoding); ablation and
generation are cut into tasks that two worker threads share; clamped names are sampled on training.lean_decoder
where the edit point allows (`_EditingDecoder`), else with TransformerLens's hooked key-value cache.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import html
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import types
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.activations import (
    MLP_POST,
    ActivationStore,
    StoreSettings,
    UnitEdit,
    UnitSet,
    UnitStats,
    all_neuron_units,
    char_tokenizer,
    collect,
    feature_units,
    hook_units,
    pearson,
)
from training.errors import VillesError
from training.lm import log_probs
from training.sae import sae_positions
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, CharTokenizer, replace_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "checkpoints" / "transformer"
DEFAULT_SAE = REPO_ROOT / "checkpoints" / "sae"
STATIC = Path(__file__).resolve().parent / "static"
FORMAT = "villes-dashboards-1"
MARKERS = {"<bos>": "^", "<eos>": "$", " ": "\u2423", "<pad>": "\u2205"}  # how the pages draw these symbols


@dataclass(frozen=True)
class DashboardSettings:
    store: StoreSettings = field(default_factory=StoreSettings)
    n_effect: int = 8  # top examples per unit that are ablated (per-character panel and logit effect)
    clamp: tuple[float, ...] = (0.0, 1.0, 2.0)  # clamp values, as multiples of the unit's max activation
    n_generate: int = 3  # names generated per clamp value
    n_neighbours: int = 8
    effect_batch: int = 256  # rows per forward when ablating (small batches: less padding, warm caches)
    generate_batch: int = 2048  # rows sampled together
    generate_max_len: int = 32  # characters; a clamp that never lets a name end is cut there (marked with ...)
    seed: int = 0

    def validate(self) -> None:
        self.store.validate()
        for name in ("n_effect", "n_generate", "n_neighbours", "effect_batch", "generate_batch", "generate_max_len"):
            if getattr(self, name) <= 0:
                raise VillesError(f"dashboard setting {name} must be positive, got {getattr(self, name)}")
        if not self.clamp or not all(math.isfinite(c) for c in self.clamp):
            raise VillesError(f"clamp multiples must be finite numbers, got {self.clamp}")


def display(symbol: str) -> str:
    return MARKERS.get(symbol, symbol)


# --- causal effects --------------------------------------------------------------------------------------------------
@dataclass
class Effects:
    """Per unit set: ablation deltas on the top examples, logit effects, clamped generations."""

    ablation: dict[int, list[tuple[int, list[float]]]]  # local unit -> [(name index, delta per predicted symbol)]
    through: Float[Tensor, "units vocab"]  # centred logit change per unit of activation (NaN: dead unit)
    raw: Float[Tensor, "units vocab"] | None  # centred direction . W_U
    generated: dict[int, list[list[str]]]  # local unit -> one list of names per clamp value
    clamp_values: dict[int, list[float]]


def _predictable(vocab: int) -> Tensor:
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[[PAD_ID, BOS_ID]] = False  # never predicted (training.lm masks them)
    return keep


def _centre(x: Float[Tensor, "... vocab"], keep: Tensor) -> Float[Tensor, "... vocab"]:
    return (x - x[..., keep].mean(-1, keepdim=True)) * keep


@torch.no_grad()
def ablation_effects(
    model,
    tok: CharTokenizer,
    st: UnitStats,
    names: Sequence[str],
    n_effect: int,
    batch: int = 256,
    bar=None,
    units: Sequence[int] | None = None,
) -> tuple[dict[int, list[tuple[int, list[float]]]], Float[Tensor, "units vocab"]]:
    """Zero-ablate each unit (of `units`, local indices; default all) on its top examples (see the module docstring);
    returns the per-character deltas and the mean centred logit change at the peak character per unit of activation
    (NaN rows for units not asked for or never active)."""
    s = st.unit_set
    U, V = len(s), model.cfg.d_vocab
    keep_v = _predictable(V)
    rows = []  # (unit, name index, peak character, peak value, slot in the top reservoir)
    for u in range(U) if units is None else units:
        for k in range(min(n_effect, st.top.key.shape[1])):
            if not math.isfinite(float(st.top.key[u, k])):
                break
            vec = st.top.vec[u, k]
            p = int(vec.argmax())
            rows.append((u, int(st.top.name[u, k]), p, float(vec[p]), k))
    through = torch.full((U, V), math.nan)
    sums, counts = torch.zeros(U, V), torch.zeros(U)
    out: dict[int, list[tuple[int, list[float]]]] = {}
    rows.sort(key=lambda r: (len(names[r[1]]), r[1]))
    # with right padding and learned positions, the residual stream before the hook's block is all the rest needs
    start = s.layer if s.layer and model.cfg.positional_embedding_type in ("standard", "rotary") else None
    # a block's output (hook_resid_post) feeds only the blocks after it (for the last block: the final norm alone)
    after = None
    if re.fullmatch(r"blocks\.\d+\.hook_resid_post", s.hook) and model.cfg.positional_embedding_type in (
        "standard",
        "rotary",
    ):
        after = s.layer + 1
    for b0 in range(0, len(rows), batch):
        chunk = rows[b0 : b0 + batch]
        units = torch.tensor([r[0] for r in chunk])
        name_ids = torch.tensor([r[1] for r in chunk])
        uniq, inv = torch.unique(name_ids, return_inverse=True)
        tokens_u = tok.batch([names[i] for i in uniq])
        tokens = tokens_u[inv]
        # the unit's clean value at each character is in the store: a feature's edit needs no SAE encoding
        T = tokens.shape[1]  # <bos>, the longest name's characters, <eos>
        current = torch.zeros(tokens.shape)
        current[:, 1 : T - 1] = st.top.vec[units, torch.tensor([r[4] for r in chunk]), : T - 2]
        edit = UnitEdit(s, units, torch.zeros(len(chunk)), sae_positions(tokens), current)
        if after is not None:  # the hook is a block's output: edit the clean one, run only what follows it
            logits_u, cache = model.run_with_cache(tokens_u, names_filter=s.hook)
            logits_abl = model(edit(cache[s.hook][inv]), start_at_layer=after)
        elif start:  # blocks before the hook's are unchanged by the edit: run them once per distinct name
            logits_u, cache = model.run_with_cache(tokens_u, names_filter=f"blocks.{start}.hook_resid_pre")
            with model.hooks(fwd_hooks=[(s.hook, edit)]):
                logits_abl = model(cache[f"blocks.{start}.hook_resid_pre"][inv], start_at_layer=start)
        else:
            logits_u = model(tokens_u)
            with model.hooks(fwd_hooks=[(s.hook, edit)]):
                logits_abl = model(tokens)
        lp_clean_u = log_probs(logits_u)  # each distinct name once
        lp_clean, lp_abl = lp_clean_u[inv], log_probs(logits_abl)
        tgt = tokens[:, 1:].clamp(min=0)[..., None]
        delta = (lp_clean[:, :-1].gather(-1, tgt) - lp_abl[:, :-1].gather(-1, tgt)).squeeze(-1)
        peak = torch.tensor([r[2] for r in chunk]) + 1  # token position of the peak character
        value = torch.tensor([r[3] for r in chunk])
        ar = torch.arange(len(chunk))
        # log-probs differ from logits by one constant per row, which centring removes: this is the logit change
        d_logit = lp_clean[ar, peak] - lp_abl[ar, peak]
        d_logit = _centre(torch.nan_to_num(d_logit, nan=0.0, posinf=0.0, neginf=0.0), keep_v)
        sums.index_add_(0, units, d_logit / value[:, None])
        counts.index_add_(0, units, torch.ones(len(chunk)))
        n_pred = (tokens[:, 1:] != PAD_ID).sum(1)
        for i, (u, name, *_) in enumerate(chunk):
            out.setdefault(u, []).append((name, delta[i, : int(n_pred[i])].tolist()))
        if bar is not None:
            bar.update(len(chunk))
    alive = counts > 0
    through[alive] = sums[alive] / counts[alive, None]
    # keep each unit's examples in top order (rows were sorted by length for batching)
    for u, ex in out.items():
        order = {int(n): k for k, n in enumerate(st.top.name[u].tolist())}
        ex.sort(key=lambda e: order.get(e[0], 1 << 30))
    return out, through


@contextmanager
def _threads(n: int):
    """Run with n intra-op threads, then restore. Sampling steps work on tensors of a few hundred kB: splitting them
    across threads costs more in synchronisation than it saves (4-15x slower with 2 threads on this busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def auto_threads() -> int:
    """Threads for a run on this machine: every core when it is idle, one when other work already keeps the cores
    busy (torch's threads spin while they wait for each other, so on a loaded machine two threads can run 10x
    slower than one)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, round(cores - load)))


@torch.no_grad()
def generate(
    model,
    tok: CharTokenizer,
    uniforms: Float[Tensor, "samples steps"],
    sample_of_row: Int[Tensor, " rows"],
    edit: UnitEdit | None = None,
    max_len: int | None = None,
) -> list[str]:
    """Sample one name per row with TransformerLens's key-value cache and the edit hook firing at every step.

    training.sampling.sample_names cannot serve here: it drops finished rows from its batch, and its hooks are not
    told which rows are left, so a hook cannot clamp a different unit in each row. This loop tells `edit.rows`.
    Row r draws its token at step t by inverse CDF with uniforms[sample_of_row[r], t] (common random numbers). A name
    still unfinished after max_len characters is cut there and marked with an ellipsis.

    Where the edit sits at a point `_EditingDecoder` reaches (an MLP's hook_post, the last block's hook_resid_post,
    or no edit at all), the same loop runs on training.lean_decoder instead: the same arithmetic without
    TransformerLens's per-step overhead (several times faster here), checked equal by the tests."""
    n, limit = len(sample_of_row), model.cfg.n_ctx  # tokens, <bos> included
    if max_len is not None:
        limit = min(limit, max_len + 2)
    if _EditingDecoder.reaches(model, edit):
        return _generate_lean(model, tok, uniforms, sample_of_row, edit, limit)
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, n)
    live = torch.arange(n)
    seqs = torch.full((n, 1), BOS_ID)
    nxt = seqs
    out: list[str] = [""] * n
    hooks = [(edit.s.hook, edit)] if edit is not None else []
    with model.hooks(fwd_hooks=hooks):
        for t in range(limit - 1):
            if edit is not None:
                edit.rows = live
            choice = _draw(model(nxt, past_kv_cache=cache)[:, -1], uniforms[sample_of_row[live], t])
            seqs = torch.cat([seqs, choice[:, None]], 1)
            done = (choice == EOS_ID) | (seqs.shape[1] >= limit)
            for j in done.nonzero().flatten().tolist():
                out[int(live[j])] = _finish(tok, seqs[j, 1:].tolist(), limit)
            if bool(done.all()):
                break
            if bool(done.any()):
                keep = ~done
                seqs, live, choice = seqs[keep], live[keep], choice[keep]
                for entry in cache.entries:
                    entry.past_keys, entry.past_values = entry.past_keys[keep], entry.past_values[keep]
                cache.previous_attention_mask = cache.previous_attention_mask[keep]
            nxt = choice[:, None]
    if edit is not None:
        edit.rows = None
    return out


def _draw(logits: Float[Tensor, "rows vocab"], u: Float[Tensor, " rows"]) -> Int[Tensor, " rows"]:
    """Inverse-CDF sampling: the token whose cumulative probability first reaches u (uniform in [0, 1))."""
    cdf = log_probs(logits).exp().cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp(max=logits.shape[1] - 1)


def _finish(tok: CharTokenizer, tokens: list[int], limit: int) -> str:
    """A sampled name from its tokens after <bos>; one that filled the context is cut and marked with an ellipsis."""
    text = tok.decode(tokens)
    return text if tokens and tokens[-1] == EOS_ID else text[: limit - 2] + "\u2026"


class _EditingDecoder:
    """training.lean_decoder's LeanDecoder with one UnitEdit applied at a point its step already passes through,
    so nothing of the step is rewritten: an MLP's hook_post is the output of its activation function (called once
    per block, in order), and the last block's hook_resid_post is the input of the final norm."""

    @staticmethod
    def reaches(model, edit: UnitEdit | None) -> bool:
        from training import lean_decoder

        if not lean_decoder.supports(model):
            return False
        if edit is None:
            return True
        hook = edit.s.hook
        return bool(MLP_POST.match(hook)) or hook == f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def __init__(self, model, batch: int, edit: UnitEdit | None):
        from training.lean_decoder import LeanDecoder

        self.dec = LeanDecoder(model, batch)
        self.edit, self.layer = edit, 0
        m = MLP_POST.match(edit.s.hook) if edit is not None else None
        self.mlp_layer = int(m.group(1)) if m else None
        if m:
            act = self.dec.act

            def edited_act(h):
                out = act(h)
                self.layer += 1
                return self.edit(out) if self.layer - 1 == self.mlp_layer else out

            self.dec.act = edited_act
        elif edit is not None:
            norm, ln_f = self.dec._norm, self.dec.ln_f

            def edited_norm(x, wb):
                return norm(self.edit(x[:, None])[:, 0] if wb is ln_f else x, wb)

            self.dec._norm = edited_norm

    def step(self, tokens: Int[Tensor, "batch 1"]) -> Float[Tensor, "batch vocab"]:
        self.layer = 0
        return self.dec.step(tokens)


def _generate_lean(model, tok, uniforms, sample_of_row, edit: UnitEdit | None, limit: int) -> list[str]:
    """`generate` on the lean decoder. Finished rows stay in it (fed <eos>, outputs ignored) until fewer than 60%
    are live, as in training.sampling: compacting the cache at every finished name would copy it at most steps."""
    n = len(sample_of_row)
    dec = _EditingDecoder(model, n, edit)
    row = torch.arange(n)  # the original row of each decoder row
    live = torch.ones(n, dtype=torch.bool)
    tokens = torch.full((n, limit), EOS_ID)  # sampled tokens after <bos>, per original row
    length = torch.zeros(n, dtype=torch.long)
    nxt = torch.full((n, 1), BOS_ID)
    for t in range(limit - 1):
        if edit is not None:
            edit.rows = row
        logits = dec.step(nxt)
        idx = live.nonzero().flatten()
        choice = _draw(logits[idx], uniforms[sample_of_row[row[idx]], t])
        tokens[row[idx], t] = choice
        length[row[idx]] = t + 1
        nxt = torch.full((len(row), 1), EOS_ID)
        nxt[idx, 0] = choice
        live[idx[choice == EOS_ID]] = False
        if t + 2 >= limit or not bool(live.any()):
            break
        if int(live.sum()) < 0.6 * dec.dec.batch:
            keep = live.nonzero().flatten()
            dec.dec.keep(keep)
            row, live, nxt = row[keep], live[keep], nxt[keep]
    if edit is not None:
        edit.rows = None
    return [_finish(tok, tokens[r, : int(length[r])].tolist(), limit) for r in range(n)]


def clamped_generations(
    model,
    tok,
    st: UnitStats,
    settings: DashboardSettings,
    uniforms: Tensor,
    bar=None,
    units: Sequence[int] | None = None,
) -> tuple[dict[int, list[list[str]]], dict[int, list[float]]]:
    """Names generated with each live unit (of `units`, local indices; default all) clamped at settings.clamp x its
    max activation, batched over units."""
    s, S, M = st.unit_set, settings.n_generate, len(settings.clamp)
    alive = [u for u in (range(len(s)) if units is None else units) if float(st.max[u]) > 0]
    mult = torch.tensor(settings.clamp)
    gens: dict[int, list[list[str]]] = {}
    values = {u: [float(m * st.max[u]) for m in mult] for u in alive}
    per_chunk = max(1, settings.generate_batch // (S * M))
    for c0 in range(0, len(alive), per_chunk):
        units = torch.tensor(alive[c0 : c0 + per_chunk])
        units_r = units.repeat_interleave(M * S)
        vals = (st.max[units][:, None] * mult[None]).repeat_interleave(S, dim=1).reshape(-1)
        sample = torch.arange(S).repeat(len(units) * M)
        names = generate(model, tok, uniforms, sample, UnitEdit(s, units_r, vals), settings.generate_max_len)
        for i, u in enumerate(units.tolist()):
            block = names[i * M * S : (i + 1) * M * S]
            gens[u] = [block[m * S : (m + 1) * S] for m in range(M)]
        if bar is not None:
            bar.update(len(units_r))
    return gens, values


# --- neighbours ------------------------------------------------------------------------------------------------------
def _top_excluding(sim: Float[Tensor, "units others"], exclude: Tensor | None, k: int):
    sim = sim.clone()
    if exclude is not None:
        sim[torch.arange(len(sim)), exclude] = -math.inf
    k = min(k, sim.shape[1] - (exclude is not None))
    if k <= 0:
        return torch.zeros(len(sim), 0, dtype=torch.long), torch.zeros(len(sim), 0)
    top = sim.topk(k, dim=1)
    return top.indices, top.values


def neighbours(model, store: ActivationStore, k: int) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
    """Per set: nearest units by output-direction cosine (decoder rows for features, W_out rows for neurons) and most
    correlated MLP neurons (Pearson over the split); for neuron sets also the most correlated features of any
    feature set collected in the same pass. Indices are global within their family."""
    out: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    d_mlp = model.cfg.d_mlp or 0
    feature_corr = {
        sid: pearson(st.corr) for sid, st in store.stats.items() if st.unit_set.kind == "feature" and st.corr
    }
    for sid, st in store.stats.items():
        s, res = st.unit_set, {}
        w = None
        if s.kind == "feature":
            w = s.sae.W_dec.detach().float() if s.sae is not None else None
        elif s.kind == "neuron":
            w = model.blocks[s.layer].mlp.W_out.detach().float()
        if w is not None:
            wn = torch.nn.functional.normalize(w, dim=1)
            res["cosine"] = _top_excluding(wn[s.indices] @ wn.T, s.indices, k)
        if st.corr:
            excl = s.layer * d_mlp + s.indices if s.kind == "neuron" else None
            res["neurons"] = _top_excluding(pearson(st.corr), excl, k)
            if s.kind == "neuron":
                for fid, fc in feature_corr.items():
                    fs = store[fid].unit_set
                    idx, val = _top_excluding(fc[:, s.layer * d_mlp + s.indices].T, None, k)
                    res[f"features:{fid}"] = (fs.indices[idx], val)
        out[sid] = res
    return out


# --- page data -------------------------------------------------------------------------------------------------------
def _r(x, nd: int = 3):
    """Rounded plain floats for compact JSON (float64 first: float32 values print with long tails)."""
    if isinstance(x, (list, tuple)):
        x = torch.tensor(x)
    if isinstance(x, Tensor):
        return torch.round(x.double(), decimals=nd).tolist()
    return round(float(x), nd)


class _Examples:
    """A reservoir as plain lists, rounded once for the whole set (per-unit tensor indexing dominated page time).
    Only the kept entries' characters are converted (a name fills about a quarter of its padded row)."""

    def __init__(self, store: ActivationStore, res):
        self.store = store
        ok = torch.isfinite(res.key) & (res.name >= 0)
        name = res.name[ok]
        lengths = torch.tensor([len(n) for n in store.names])[name]
        valid = torch.arange(res.vec.shape[-1]) < lengths[:, None]
        values = torch.round(res.vec[ok][valid].double(), decimals=3).tolist()
        ends = lengths.cumsum(0).tolist()
        self.vectors = [values[e - n : e] for e, n in zip(ends, lengths.tolist(), strict=True)]
        self.names = name.tolist()
        self.first = (ok.sum(1).cumsum(0) - ok.sum(1)).tolist()  # first kept entry of each group (kept come first)
        self.count = ok.sum(1).tolist()
        self.region = store.name_region.tolist()

    def __call__(self, g: int) -> list[dict]:
        out = []
        names, regions = self.store.names, self.store.region_names
        for i in range(self.first[g], self.first[g] + self.count[g]):
            nid = self.names[i]
            out.append({"n": names[nid], "v": self.vectors[i], "g": regions[self.region[nid]]})
        return out


def set_examples(store: ActivationStore, st: UnitStats) -> dict[str, _Examples]:
    return {
        k: _Examples(store, getattr(st, k)) for k in ("top", "bottom", "bands", "random") if getattr(st, k) is not None
    }


def _unit_href(set_id: str, index: int) -> str:
    return f"../{set_id}/{index}.html"


def _neuron_label(model, g: int) -> tuple[str, str, int]:
    d_mlp = model.cfg.d_mlp
    return f"mlp{g // d_mlp}", f"mlp{g // d_mlp}:{g % d_mlp}", g % d_mlp


def histogram(st: UnitStats, u: int) -> dict:
    """Bars from the most negative bin to the last non-empty positive one: centres, widths, counts."""
    B = st.hist_pos.shape[1]
    x, w, counts = [], [], []

    def filled(h: Tensor) -> list[int]:  # the counts up to the last non-empty bin
        h = h.long().tolist()
        last = max((i for i, c in enumerate(h) if c > 0), default=-1)
        return h[: last + 1]

    if st.hist_neg is not None and float(st.range_neg[u]) > 0:
        h, wn = filled(st.hist_neg[u]), float(st.range_neg[u]) / B
        for i in range(len(h) - 1, -1, -1):
            x.append(-wn * (i + 0.5))
            w.append(wn)
            counts.append(h[i])
    h, wp = filled(st.hist_pos[u]), float(st.range_pos[u]) / B
    for i in range(len(h)):
        x.append(wp * (i + 0.5))
        w.append(wp)
        counts.append(h[i])
    return {
        "x": [round(v, 5) for v in x],
        "w": [round(v, 5) for v in w],
        "counts": counts,
        "nonzero_only": st.unit_set.kind == "feature",
    }


def unit_page_data(
    model,
    store: ActivationStore,
    st: UnitStats,
    u: int,
    effects: Effects,
    neigh: dict[str, tuple[Tensor, Tensor]],
    built: Mapping[str, set[int]],
    labels: Mapping[tuple[str, int], tuple[str, float]] | None,
    baseline_names: list[str],
    settings: DashboardSettings,
    examples: dict[str, _Examples] | None = None,
) -> dict:
    s, cfg = st.unit_set, store.settings
    ex = examples or set_examples(store, st)
    index = int(s.indices[u])
    vocab = store.vocab
    n = max(st.n_tokens, 1)
    active = float(st.active_char[:, u].sum())
    dead = active == 0
    dense = active / n > cfg.dense_threshold
    mx, mn = float(st.max[u]), float(st.min[u])
    label = (labels or {}).get((s.id, index))
    d: dict[str, Any] = {
        "set": s.id,
        "index": index,
        "kind": s.kind,
        "hook": s.hook,
        "label": label[0] if label else None,
        "score": _r(label[1]) if label else None,
        "flags": (["dead"] if dead else []) + (["dense"] if dense else []),
        "stats": {
            "n_tokens": st.n_tokens,
            "n_names": st.n_names,
            "density": active / n,
            "active_names": float(st.active_names[u]) / max(st.n_names, 1),
            "max": _r(mx) if math.isfinite(mx) else None,
            "min": _r(mn) if math.isfinite(mn) else None,
            "mean": _r(st.sum_char[:, u].sum() / n),
            "mean_active": _r(st.sum_char[:, u].sum() / active) if active else None,
        },
        "scale": max(abs(mx) if math.isfinite(mx) else 0, abs(mn) if math.isfinite(mn) and s.signed else 0) or 1.0,
        "dense_threshold": cfg.dense_threshold,
    }
    siblings = sorted(built.get(s.id, ()))
    pos_in = siblings.index(index)
    d["nav"] = {
        "prev": f"{siblings[pos_in - 1]}.html" if pos_in > 0 else None,
        "next": f"{siblings[pos_in + 1]}.html" if pos_in + 1 < len(siblings) else None,
    }
    if dead:
        return d
    d["top"] = ex["top"](u)
    if "bottom" in ex:
        d["bottom"] = ex["bottom"](u)
    nb = cfg.n_bands
    fires = max(float(st.active_names[u]), 1.0)
    width = float(st.range_pos[u]) / nb  # bands are [b, b+1) * width, up to the power of two above the max
    bands = []
    for b in reversed(range(min(nb, int(mx // width) + 1))):
        pct = 100 * float(st.band_count[u, b]) / fires
        hi = min(width * (b + 1), mx)
        bands.append({"lo": _r(width * b), "hi": _r(hi), "pct": _r(pct, 1), "ex": ex["bands"](u * nb + b)})
    d["bands"] = bands
    d["random"] = ex["random"](u)
    d["hist"] = histogram(st, u)
    keep_v = _predictable(len(vocab))
    order = torch.argsort(effects.through[u][keep_v], descending=True)
    ids = keep_v.nonzero().flatten()[order]
    d["logits"] = {
        "labels": [display(vocab[i]) for i in ids.tolist()],
        "through": _r(effects.through[u][ids]),
        "raw": _r(effects.raw[u][ids]) if effects.raw is not None else None,
        "n": len(effects.ablation.get(u, [])),
    }
    for g, key in (("char", "by_char"), ("prev", "by_prev")):
        cnt = getattr(st, f"count_{g}")
        ids = (cnt > 0).nonzero().flatten()
        d[key] = {
            "labels": [display(vocab[i]) for i in ids.tolist()],
            "mean": _r(getattr(st, f"sum_{g}")[ids, u] / cnt[ids]),
            "rate": _r(getattr(st, f"active_{g}")[ids, u] / cnt[ids]),
            "count": cnt[ids].long().tolist(),
        }
    cnt = st.count_pos
    ids = (cnt > 0).nonzero().flatten()
    d["by_pos"] = {
        "labels": ids.tolist(),
        "mean": _r(st.sum_pos[ids, u] / cnt[ids]),
        "rate": _r(st.active_pos[ids, u] / cnt[ids]),
        "count": cnt[ids].long().tolist(),
    }
    if len(store.region_names) > 1 or store.region_names[0] != "(unknown)":
        mass = st.mass_region[:, u]
        base = st.count_region / st.count_region.sum()
        order = torch.argsort(base, descending=True)
        d["regions"] = {
            "labels": [store.region_names[i] for i in order.tolist()],
            "share": _r(mass[order] / mass.sum().clamp(min=1e-12), 4),
            "baseline": _r(base[order], 4),
        }
    d["ablation"] = [{"n": store.names[nid], "d": _r(delta)} for nid, delta in effects.ablation.get(u, [])]
    if u in effects.generated:
        d["generated"] = {
            "multiples": list(settings.clamp),
            "values": _r(torch.tensor(effects.clamp_values[u])),
            "names": effects.generated[u],
            "baseline": baseline_names,
        }
    nbrs = {}
    for kind, (idx, val) in neigh.items():
        rows = []
        for i, v in zip(idx[u].tolist(), val[u].tolist(), strict=True):
            if kind == "neurons":
                sid, text, local = _neuron_label(model, i)
            elif kind.startswith("features:"):
                sid = kind.split(":", 1)[1]
                text, local = f"{sid}:{i}", i
            else:
                sid, text, local = s.id, f"{s.id}:{i}", i
            rows.append([text, _unit_href(sid, local) if local in built.get(sid, ()) else None, _r(v)])
        nbrs[kind] = rows
    d["neighbours"] = nbrs
    return d


# --- HTML ------------------------------------------------------------------------------------------------------------
def _json_for_script(obj) -> str:
    """JSON safe inside <script>: no '</' sequence can close the tag."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def _page(title: str, body_class: str, data: dict, depth: int) -> str:
    up = "../" * depth
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        f'<link rel="stylesheet" href="{up}assets/dashboard.css">'
        f'<script src="{up}assets/plotly.min.js"></script><script src="{up}assets/dashboard.js"></script>'
        f'</head><body class="{body_class}"><div id="app"></div>'
        f"<script>villesDashboard.render({_json_for_script(data)});</script></body></html>\n"
    )


def _write_assets(folder: Path) -> None:
    import plotly

    assets = folder / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not plotly_js.is_file():
        raise VillesError(f"plotly's script is missing from the plotly package ({plotly_js})")
    shutil.copyfile(plotly_js, assets / "plotly.min.js")
    for name in ("dashboard.js", "dashboard.css"):
        shutil.copyfile(STATIC / name, assets / name)


def _index_row(d: dict) -> list:
    st = d["stats"]
    return [
        d["set"],
        d["index"],
        d["kind"],
        _r(st["density"], 5),
        st["max"],
        st["mean"],
        " ".join(d["flags"]),
        d["label"],
        d["score"],
        ", ".join(e["n"] for e in d.get("top", [])[:3]),
    ]


# --- Neuronpedia export ----------------------------------------------------------------------------------------------
def _np_tokens(name: str) -> list[str]:
    return ["<bos>", *name, "<eos>"]


def _np_values(values: list[float]) -> list[float]:
    return [0.0, *values, 0.0]


def neuronpedia_feature(
    d: dict, st: UnitStats, u: int, vocab: list[str], logit: Float[Tensor, " vocab"], dataset: str
) -> dict:
    """The fields of SAE-Dashboard's NeuronpediaDashboardFeature for one unit. `logit` is the raw direct path as
    SAE-Dashboard computes it (direction . W_U, not centred), or the through-model effect for a hook without one."""
    ids = _predictable(len(vocab)).nonzero().flatten()
    logit = logit[ids]
    k = min(10, len(ids))
    top, bottom = logit.topk(k), logit.topk(k, largest=False)
    lo, hi = float(logit.min()), float(logit.max())
    width = (hi - lo) / 20 or 1.0
    logit_counts = torch.histc(logit, 20, lo, lo + 20 * width)
    acts = []
    for e in d.get("top", []):
        acts.append(
            {
                "bin_min": -1,
                "bin_max": d["stats"]["max"],
                "bin_contains": -1,
                "tokens": _np_tokens(e["n"]),
                "values": _np_values(e["v"]),
            }
        )
    for band in d.get("bands", []):
        for e in band["ex"]:
            acts.append(
                {
                    "bin_min": band["lo"],
                    "bin_max": band["hi"],
                    "bin_contains": _r(band["pct"] / 100, 4),
                    "tokens": _np_tokens(e["n"]),
                    "values": _np_values(e["v"]),
                }
            )
    hist = d.get("hist")
    centres = hist["x"] if hist else []
    align_i, align_v, align_l1 = [], [], []
    s = st.unit_set
    if s.kind == "feature" and s.sae is not None:  # the decoder row in the hook's basis
        w = s.sae.W_dec.detach().float()[s.indices[u]]
        t = w.abs().topk(min(10, len(w)))
        align_i, align_v = t.indices.tolist(), _r(w[t.indices])
        align_l1 = _r(w[t.indices].abs() / w.abs().sum().clamp(min=1e-12))
    nbr = d.get("neighbours", {}).get("neurons", [])
    feats = next((v for k2, v in d.get("neighbours", {}).items() if k2.startswith("features:")), [])
    return {
        "feature_index": d["index"],
        "neuron_alignment_indices": align_i,
        "neuron_alignment_values": align_v,
        "neuron_alignment_l1": align_l1,
        "correlated_neurons_indices": [int(x[0].rsplit(":", 1)[1]) for x in nbr],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [x[2] for x in nbr],
        "correlated_features_indices": [int(x[0].rsplit(":", 1)[1]) for x in feats],
        "correlated_features_l1": [],
        "correlated_features_pearson": [x[2] for x in feats],
        "neg_str": [vocab[i] for i in ids[bottom.indices].tolist()],
        "neg_values": _r(bottom.values),
        "pos_str": [vocab[i] for i in ids[top.indices].tolist()],
        "pos_values": _r(top.values),
        "frac_nonzero": d["stats"]["density"],
        "freq_hist_data_bar_values": centres,
        "freq_hist_data_bar_heights": hist["counts"] if hist else [],
        "logits_hist_data_bar_heights": logit_counts.long().tolist(),
        "logits_hist_data_bar_values": [_r(lo + width * (i + 0.5), 4) for i in range(20)],
        "n_prompts_total": d["stats"]["n_names"],
        "n_tokens_in_prompt": 0,  # names have no fixed length; each activation lists its own tokens
        "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": acts,
    }


# --- the whole job ---------------------------------------------------------------------------------------------------
class Clock:
    """Wall-clock and CPU seconds per stage (CPU counts every thread: on a busy machine it is the steadier figure)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - w
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - c

    def add(self, stage: str, wall: float, cpu: float) -> None:
        self.wall[stage] = self.wall.get(stage, 0.0) + wall
        self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu

    def total(self) -> float:
        """Wall-clock seconds of the top-level stages (indented rows are parts of one of them)."""
        return sum(v for k, v in self.wall.items() if not k.startswith(" "))

    def table(self) -> list[dict]:
        return [{"stage": k, "wall_s": self.wall[k], "cpu_s": self.cpu[k]} for k in self.wall]


@dataclass
class DashboardResult:
    out: Path
    store: ActivationStore
    pages: int
    clock: Clock
    sets: list[dict]


def causal_panels(
    model,
    tok: CharTokenizer,
    store: ActivationStore,
    sets: Sequence[UnitSet],
    settings: DashboardSettings,
    clock: Clock | None = None,
    progress: bool = False,
    workers: int = 2,
) -> tuple[dict[str, Effects], dict[str, Tensor | None], list[str]]:
    """Ablations and clamped generations of every set: (effects per set id, raw direction . W_U per set id, the
    unclamped baseline names).

    The work is cut into tasks (a set's units in chunks, for ablation or for generation) that `workers` threads take
    from one list, biggest first, each with one torch thread: the generation steps are too small to share out within
    an operation, and two threads of work keep both cores of a small machine busy to the end. torch releases the
    GIL inside its kernels, so the threads overlap. Hooks live on modules, so each worker runs its own copy of the
    model (and of each SAE). Results do not depend on the number of workers."""
    uniforms = torch.rand(settings.n_generate, model.cfg.n_ctx, generator=torch.Generator().manual_seed(settings.seed))
    W_U = model.W_U.detach().float()
    keep_v = _predictable(model.cfg.d_vocab)
    n_rows = sum(  # the bar counts forward rows: ablated examples and clamped samples
        int(torch.isfinite(store[s.id].top.key[:, : settings.n_effect]).sum())
        + int((store[s.id].max > 0).sum()) * settings.n_generate * len(settings.clamp)
        for s in sets
    )
    bar = tqdm(total=n_rows, desc="causal panels", unit="row", disable=not progress, dynamic_ncols=True)
    per_gen = max(1, settings.generate_batch // (settings.n_generate * len(settings.clamp)))
    per_abl = max(1, settings.effect_batch * 4 // settings.n_effect)
    tasks: list[tuple[str, str, list[int] | None]] = [("baseline", "", None)]
    for kind, size in (("generation", per_gen), ("ablation", per_abl)):  # generation chunks cost the most
        for s in sets:
            tasks += [(kind, s.id, list(range(c, min(c + size, len(s))))) for c in range(0, len(s), size)]
    tasks.reverse()  # popped from the end
    lock = threading.Lock()
    results: list[tuple[tuple, Any]] = []
    errors: list[BaseException] = []
    spent: dict[str, list[float]] = {}

    def work(m) -> None:
        own = {s.id: dataclasses.replace(s, sae=copy.deepcopy(s.sae)) if s.sae is not None else s for s in sets}
        stats = {s.id: dataclasses.replace(store[s.id], unit_set=own[s.id]) for s in sets}
        while not errors:
            with lock:
                if not tasks:
                    return
                task = tasks.pop()
            kind, sid, units = task
            w, c = time.perf_counter(), time.thread_time()
            try:
                if kind == "baseline":
                    out = generate(m, tok, uniforms, torch.arange(settings.n_generate), None, settings.generate_max_len)
                elif kind == "generation":
                    out = clamped_generations(m, tok, stats[sid], settings, uniforms, bar, units)
                else:
                    out = ablation_effects(
                        m, tok, stats[sid], store.names, settings.n_effect, settings.effect_batch, bar, units
                    )
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)
                return
            with lock:
                results.append((task, out))
                t = spent.setdefault(f"  {'generation' if kind == 'baseline' else kind} (tasks)", [0.0, 0.0])
                t[0] += time.perf_counter() - w
                t[1] += time.thread_time() - c

    models = [model] + [copy.deepcopy(model) for _ in range(max(1, workers) - 1)]
    with _threads(1):
        threads = [
            threading.Thread(target=work, args=(m,), name=f"villes-causal-{i}", daemon=True)
            for i, m in enumerate(models[1:])
        ]
        for t in threads:
            t.start()
        try:
            work(models[0])
        finally:
            for t in threads:
                t.join()
    bar.close()
    if errors:
        raise errors[0]
    if clock is not None:
        for stage, (w, c) in spent.items():
            clock.add(stage, w, c)
    baseline: list[str] = []
    abl = {s.id: ({}, torch.full((len(s), model.cfg.d_vocab), math.nan)) for s in sets}
    gen = {s.id: ({}, {}) for s in sets}
    for (kind, sid, units), out in results:
        if kind == "baseline":
            baseline = out
        elif kind == "generation":
            gen[sid][0].update(out[0])
            gen[sid][1].update(out[1])
        else:
            abl[sid][0].update(out[0])
            abl[sid][1][units] = out[1][units]
    effects, direct = {}, {}
    for s in sets:
        dirs = s.directions(model)
        direct[s.id] = dirs @ W_U if dirs is not None else None  # raw, uncentred (the export wants it so)
        raw = _centre(direct[s.id], keep_v) if dirs is not None else None
        effects[s.id] = Effects(abl[s.id][0], abl[s.id][1], raw, *gen[s.id])
    return effects, direct, baseline


def unit_sets_for(
    model, sae=None, hook: str | None = None, units: Sequence[int] | None = None, neurons: bool | None = None
) -> list[UnitSet]:
    """What `dashboards` builds: the SAE's features (on `hook` or the hook its metadata names); else the units of
    `hook`; else every MLP neuron. neurons=True adds every MLP neuron beside an SAE (with `units`, those of the
    indices each layer has: `--units 0-999` beside a 2,048-latent SAE means neurons 0-511 of each layer)."""
    sets: list[UnitSet] = []
    if sae is not None:
        sets.append(feature_units(model, sae, hook, units))
    elif hook is not None:
        sets.append(hook_units(model, hook, units))
    if neurons or (neurons is None and sae is None and hook is None):
        have = {s.hook for s in sets}
        if sets and units is not None and model.cfg.d_mlp:  # beside another family: the indices that fit
            units = [i for i in units if i < model.cfg.d_mlp]
        if units is None or len(units):
            sets += [s for s in all_neuron_units(model, units) if s.hook not in have]
    if not sets:
        raise VillesError("nothing to build: give an SAE, a hook, or a model with MLP neurons")
    return sets


_LABEL_KINDS = {"feature": ("feature",), "neuron": ("neuron",), "direction": ("residual", "basis")}


def resolve_labels(labels, sets: Sequence[UnitSet]) -> dict[tuple[str, int], tuple[str, float]] | None:
    """The concept slot: (set id, unit index) -> (best concept c*, Mono1). `labels` is None; such a mapping already;
    or what interp.monosemanticity reads (a `Report`, its rows, its folder or units.json), whose rows label the set
    of the same kind on the same hook: features through `sae_labels` (which refuses a report made for another SAE:
    other width or, when recorded, other weights), neurons by index, residual/basis rows the direction sets (+e_i,
    i < d). Labels that match none of the units built, or a neuron beyond its layer, mean another model: one clear
    error."""
    if labels is None:
        return None
    if isinstance(labels, Mapping) and all(isinstance(k, tuple) for k in labels):
        ids = {s.id for s in sets}
        try:
            return {(k[0], int(k[1])): (str(v[0]), float(v[1])) for k, v in labels.items() if k[0] in ids}
        except (IndexError, TypeError, ValueError):
            raise VillesError("labels must map (set id, unit index) to (concept, score)") from None
    from interp.monosemanticity import sae_labels, unit_labels

    if isinstance(labels, (str, Path)):
        path = Path(labels)
        if not path.exists():
            raise VillesError(f"--labels {path}: no such file or folder (a monosemanticity report or its units.json)")
        if path.is_file() and path.name != "units.json":  # rows saved under another name (no summary beside them)
            try:
                labels = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise VillesError(f"cannot read label rows {path}: {str(e).splitlines()[0][:200]}") from None
    scored = unit_labels(labels)  # (kind, hook, index) -> (concept, Mono1)
    out: dict[tuple[str, int], tuple[str, float]] = {}
    for s in sets:
        kinds = _LABEL_KINDS[s.kind]
        if not any(k in kinds and h == s.hook for k, h, _ in scored):
            continue
        if s.kind == "feature":
            out.update({(s.id, i): lab for i, lab in sae_labels(labels, s.sae, s.hook).items()})
            continue
        for (kind, hook, index), lab in scored.items():
            if kind not in kinds or hook != s.hook or (s.kind == "direction" and index >= s.width):
                continue  # (residual rows i >= d are the negative directions -e_(i-d))
            if not 0 <= index < s.width:
                raise VillesError(
                    f"label for {kind} {index} on {hook} is out of range ({s.width} units): the labels score "
                    "another model"
                )
            out[(s.id, index)] = lab
    if scored and not out:
        hooks = ", ".join(sorted({s.hook for s in sets}))
        raise VillesError(f"none of the labels match the units built (on {hooks}): labels of another model or SAE?")
    return out


def check_out(out: Path) -> None:
    """--out may be new, empty, or an earlier dashboards folder (replaced whole); never a file or other data."""
    from training.checkpoint import check_replaceable_out

    check_replaceable_out(out, "dashboards.json", FORMAT, "dashboards")


def dashboards(
    model,
    sae=None,
    hook: str | None = None,
    out: Path | str = "out/dashboards",
    units: Sequence[int] | None = None,
    neurons: bool | None = None,
    names: Sequence[str] | None = None,
    regions: Sequence[str] | None = None,
    settings: DashboardSettings = DashboardSettings(),
    labels: Mapping[tuple[str, int], tuple[str, float]] | Sequence[Mapping] | Path | str | None = None,
    export: str | None = None,
    tokenizer: CharTokenizer | None = None,
    progress: bool = True,
    model_id: str = "villes",
) -> DashboardResult:
    """Build the dashboards folder `out` (see the module docstring). `names`/`regions` default to the split
    `settings.store.split` of the default communes corpus. `labels` (the concept slot) maps (set id, unit index) to
    (concept, score), or gives interp.monosemanticity's rows or report folder (see `resolve_labels`)."""
    clock = Clock()
    settings.validate()
    if export not in (None, "neuronpedia"):
        raise VillesError(f"unknown export {export!r}: the only one is neuronpedia")
    out = Path(out)
    check_out(out)
    sets = unit_sets_for(model, sae, hook, units, neurons)
    labels = resolve_labels(labels, sets)
    tok = tokenizer or char_tokenizer(model)
    if names is None:
        from training.data import load_communes

        communes = load_communes().split(settings.store.split)
        names, regions = [c.name for c in communes], [c.region for c in communes]
    with clock("activations"):
        store = collect(model, sets, names, regions, settings.store, tok, progress)
    was_training = model.training
    model.eval()
    try:
        with clock("neighbours"):
            neigh = neighbours(model, store, settings.n_neighbours)
        with clock("causal panels"):
            effects, direct, baseline = causal_panels(model, tok, store, sets, settings, clock, progress)
    finally:
        model.train(was_training)

    built = {s.id: set(s.indices.tolist()) for s in sets}
    sets_info = [
        {
            "id": s.id,
            "hook": s.hook,
            "kind": s.kind,
            "width": s.width,
            "units": len(s),
            "dead": int(store[s.id].dead().sum()),
            "dense": int(store[s.id].dense(settings.store.dense_threshold).sum()),
        }
        for s in sets
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    pages = 0
    try:
        with clock("pages"):
            _write_assets(tmp)
            index_rows = []
            bar = tqdm(total=sum(len(s) for s in sets), desc="pages", disable=not progress, dynamic_ncols=True)
            dataset = f"villes communes ({settings.store.split})"
            for s in sets:
                st = store[s.id]
                examples = set_examples(store, st)
                folder = tmp / "units" / s.id
                folder.mkdir(parents=True, exist_ok=True)
                if export == "neuronpedia":
                    (tmp / "neuronpedia" / s.id).mkdir(parents=True, exist_ok=True)
                for u in range(len(s)):
                    d = unit_page_data(
                        model,
                        store,
                        st,
                        u,
                        effects[s.id],
                        neigh.get(s.id, {}),
                        built,
                        labels,
                        baseline,
                        settings,
                        examples,
                    )
                    (folder / f"{d['index']}.html").write_text(_page(f"{s.id}:{d['index']}", "unit", d, 2), "utf-8")
                    index_rows.append(_index_row(d))
                    if export == "neuronpedia":
                        logit = direct[s.id][u] if direct[s.id] is not None else effects[s.id].through[u]
                        np_d = neuronpedia_feature(d, st, u, store.vocab, torch.nan_to_num(logit), dataset)
                        (tmp / "neuronpedia" / s.id / f"{d['index']}.json").write_text(
                            json.dumps(np_d, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
                        )
                    pages += 1
                    bar.update(1)
            bar.close()
            index = {
                "title": f"{model_id} units",
                "sets": sets_info,
                "rows": index_rows,
                "columns": ["set", "unit", "kind", "density", "max", "mean", "flags", "label", "score", "top names"],
                "split": settings.store.split,
                "n_names": len(store.names),
            }
            (tmp / "index.html").write_text(_page(f"{model_id}: units", "index", index, 0), encoding="utf-8")
        manifest = {
            "format": FORMAT,
            "model_id": model_id,
            "sets": sets_info,
            "pages": pages,
            "split": settings.store.split,
            "n_names": len(store.names),
            "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
            "seconds": {r["stage"]: round(r["wall_s"], 2) for r in clock.table()},
            "export": export,
        }
        (tmp / "dashboards.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return DashboardResult(out, store, pages, clock, sets_info)


# --- command line ----------------------------------------------------------------------------------------------------
def parse_units(text: str | None) -> list[int] | None:
    """'0-99', '5', '0-9,20,30-35' -> sorted distinct indices (None: all units)."""
    if text is None:
        return None
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            if re.fullmatch(r"\s*-\d+\s*", part):
                raise VillesError(f"unit index {part.strip()} out of range: indices start at 0")
            raise VillesError(f"--units {text!r}: expected indices and ranges such as 0-99,120")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise VillesError(f"--units {text!r}: range {lo}-{hi} is empty")
        out.update(range(lo, hi + 1))
    return sorted(out)


def cmd_dashboards(args) -> int:
    from training.data import load_corpus
    from training.neural import load_checkpoint
    from training.sae import load_sae

    out = Path(args.out)
    check_out(out)
    if args.threads is not None and args.threads <= 0:
        raise VillesError(f"--threads must be positive, got {args.threads}")
    torch.set_num_threads(args.threads or auto_threads())
    checkpoint = Path(args.checkpoint) if args.checkpoint else DEFAULT_MODEL
    units = parse_units(args.units)
    model, tok, config = load_checkpoint(checkpoint)
    if config.get("kind") != "transformer":
        raise VillesError(f"{checkpoint} holds a {config.get('kind')} model: dashboards need a transformer checkpoint")
    sae, neurons = None, None
    if args.sae:
        sae = load_sae(Path(args.sae), trained_on=checkpoint)
    elif not args.hook:  # the default job: every feature of the default SAE and every MLP neuron
        neurons = True
        if DEFAULT_SAE.is_dir() and checkpoint.resolve() == DEFAULT_MODEL.resolve():
            sae = load_sae(DEFAULT_SAE, trained_on=checkpoint)
        else:
            print(
                f"villes: no SAE given (and none at {DEFAULT_SAE} for this model): building MLP neurons only",
                file=sys.stderr,
            )
    info = config.get("corpus", {})
    corpus = load_corpus(info.get("names_file"), lowercase=info.get("lowercase", True))
    communes = corpus.split(args.split)
    settings = DashboardSettings(store=StoreSettings(split=args.split))
    result = dashboards(
        model,
        sae,
        args.hook,
        out,
        units,
        neurons,
        [c.name for c in communes],
        [c.region for c in communes],
        settings,
        labels=args.labels,
        export=args.export,
        tokenizer=tok,
        progress=not args.quiet,
        model_id=f"villes/{checkpoint.name}",
    )
    from training.cli import format_table

    print(format_table(result.sets, ["id", "hook", "kind", "units", "dead", "dense"]))
    total = result.clock.total()
    print(f"{result.pages} pages in {result.out} ({total:.1f} s); open {result.out / 'index.html'}")
    return 0


def add_dashboards_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "dashboards",
        help="offline HTML dashboards of every SAE feature and MLP neuron (or the units of one hook)",
        description="With no --sae/--hook: every feature of the default SAE and every MLP neuron of the model.",
    )
    p.add_argument("--checkpoint", type=Path, default=None, help=f"model checkpoint (default {DEFAULT_MODEL.name})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sae", type=Path, default=None, help="SAELens SAE folder: build its features")
    g.add_argument(
        "--hook", default=None, help="build the units of this hook (MLP hook_post: neurons; else directions)"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (new, empty, or earlier dashboards)")
    p.add_argument("--units", default=None, help="unit indices, e.g. 0-99 or 0-9,42 (default: all)")
    p.add_argument("--split", default="all", choices=["train", "val", "test", "all"])
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="concept labels: a `villes monosemanticity` report folder or its units.json (best concept and Mono1)",
    )
    p.add_argument("--export", default=None, choices=["neuronpedia"], help="also write per-unit Neuronpedia JSON")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: every core if idle, else 1; see auto_threads)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_dashboards)
    return p


class _CallableModule(types.ModuleType):
    """`interp.dashboards(model, sae=None, hook=...)` as the issue writes it: the module, called, builds the folder
    (`dashboards` below); `from interp.dashboards import dashboards` works as ever."""

    def __call__(self, *args, **kwargs) -> DashboardResult:
        return dashboards(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
