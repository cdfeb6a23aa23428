"""The activation store: what every unit of a hook does over a corpus split, collected in one streaming pass.

Units. A unit is (hook name, index). A `UnitSet` is a family of units read at one hook:
  - "feature":   the latents of any SAELens `SAE` reading that hook (`feature_units`);
  - "neuron":    MLP neurons, `blocks.L.mlp.hook_post` (`neuron_units`); negative values are kept;
  - "direction": the basis directions of any other [batch, pos, d] hook, e.g. the residual stream (`direction_units`);
                 negative values are kept.

Positions. Statistics cover the *characters* of each name: not <bos> (position 0 attends only to itself, so every
hook holds one constant vector there), not <eos> (nothing is predicted from it) and not padding. These are the
positions the project's SAEs read (`training.sae.sae_positions`), so a feature's statistics describe exactly what it
was trained on. The pages still draw <bos> and <eos> as markers.

Pass. `Collector` streams a split through the model in batches of names sorted by length (little padding) and
yields, per batch, the flat activations of every unit set with per-position metadata (`ActBatch`). The store is one
consumer; anything else (concept scores) can iterate the same collector. `collect` makes one pass and keeps, per unit:
sums, active counts and squares grouped by current character, previous character, position and region of France;
extremes; the top-k (and, for signed units, bottom-k) names by peak activation; the activation histogram; the names
per activation band (equal-width intervals, SAE-Vis style) with a uniform sample in each band; a uniform sample of
the names where it fires; cross-moments with every MLP neuron (correlations).

Exact in one pass. Histograms and bands need a range before the maximum is known. Each unit's range is the smallest
power of two above the values seen so far; when a batch exceeds it, the range doubles and bins (and bands) merge in
pairs: every new edge is an old edge, so counts and samples stay exact, and the final range (the power of two above
the maximum) does not depend on the batch order. Memory is O(units x (groups + examples)), independent of the corpus
size: nothing per token is kept, and there is no second forward pass.

Examples are whole names: a name's score is its peak activation over its characters, and each kept example keeps the
unit's activation at every character. Samples keep the names with the smallest keys, a hash of (name, unit, seed)
(`uniform_key`), merged exactly (`_Reservoir`): the same seed gives the same examples whatever the batching.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from training.errors import VillesError
from training.sae import char_tokenizer as sae_char_tokenizer
from training.sae import hook_width, sae_positions
from training.tokenizer import CharTokenizer

KINDS = ("feature", "neuron", "direction")
MLP_POST = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# hooks whose vectors are added into the residual stream as they are (a direction there has a raw logit effect)
_RESID_SPACE = re.compile(
    r"^(hook_embed|hook_pos_embed|blocks\.\d+\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out))$"
)
UNKNOWN_REGION = "(unknown)"


# --- units -----------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class UnitSet:
    """A family of units at one hook; `indices` are the units collected (all of them by default)."""

    id: str  # short, folder-safe: "sae", "mlp0", "blocks.1.hook_resid_post"
    hook: str
    kind: str
    width: int  # units in the whole family (d_sae, d_mlp, d)
    indices: Int[Tensor, " units"]
    sae: Any = None  # the SAELens SAE of a "feature" set

    def __post_init__(self):
        if self.kind not in KINDS:
            raise VillesError(f"unknown unit kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        self.indices = torch.as_tensor(self.indices, dtype=torch.long)
        if len(self.indices) == 0:
            raise VillesError(f"{self.id}: no units selected")
        bad = self.indices[(self.indices < 0) | (self.indices >= self.width)]
        if len(bad):
            what = {"feature": "features", "neuron": "neurons", "direction": "dimensions"}[self.kind]
            raise VillesError(
                f"unit index {int(bad[0])} out of range: {self.id} has {self.width} {what} (0-{self.width - 1})"
            )
        self._all = len(self.indices) == self.width and bool((self.indices == torch.arange(self.width)).all())

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def signed(self) -> bool:
        """Neurons and directions keep negative values (bottom examples, two-sided histograms)."""
        return self.kind != "feature"

    @property
    def layer(self) -> int | None:
        m = _BLOCK.match(self.hook)
        return int(m.group(1)) if m else None

    def read_sparse(self, act: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n units"], tuple | None]:
        """`read`, plus the non-zero entries (rows, cols, values) where they come cheaply: for every latent of a TopK
        SAE, straight from its encoder's top k (scanning 2,048 dense codes per character for non-zeros took a fifth
        of the whole pass). Checked once against `sae.encode` on the first batch; any other SAE, or a mismatch,
        reads the usual way (None: the caller finds the non-zeros itself)."""
        if getattr(self, "_topk", None) is not False and self._all and self.sae is not None:
            try:
                out = self._read_topk(act)
                if getattr(self, "_topk", None) is None:
                    ok = out is not None and torch.allclose(out[0], self.read(act), rtol=1e-5, atol=1e-5)
                    self._topk = bool(ok)
                    if not ok:
                        out = None
            except Exception:  # an SAE variant this shortcut does not know: the ordinary encode serves
                self._topk, out = False, None
            if out is not None:
                return out
        return self.read(act), None

    def _read_topk(self, act: Float[Tensor, "n d"]):
        from interp.monosemanticity import _plain_topk  # the one test of "encode = pre-activation -> TopK"

        sae = self.sae
        k = _plain_topk(sae)
        if k is None:
            self._topk = False
            return None
        with torch.no_grad():
            pre = torch.addmm(sae.b_enc, sae.process_sae_in(act), sae.W_enc)
            vals, cols = pre.topk(k, dim=-1, sorted=False)
            vals = vals.relu_()
            dense = pre.zero_().scatter_(-1, cols, vals).float()
            keep = vals > 0
            rows = torch.arange(len(act))[:, None].expand_as(cols)[keep]
            return dense, (rows, cols[keep], vals[keep].float())

    def read(self, act: Float[Tensor, "n d"]) -> Float[Tensor, "n units"]:
        """The units' activations from the hook's vectors."""
        if self.sae is not None:
            act = self.sae.encode(act.to(self.sae.dtype))
            if act.is_sparse:
                act = act.to_dense()
        act = act.float()
        return act if self._all else act[:, self.indices]

    def decoder_directions(self) -> Float[Tensor, "d_sae d_in"] | None:
        """decode(e_i) - decode(0) for every latent when the SAE's decoder is affine in its code (checked once on a
        random code; None otherwise, e.g. with an input-dependent output normalization), so an edit of one latent
        is one vector. Cached: SAEs are not retrained under a running dashboard."""
        if not hasattr(self, "_dirs"):
            self._dirs = None
            sae = self.sae
            if sae is not None and getattr(sae.cfg, "normalize_activations", "none") == "none":
                with torch.no_grad():
                    eye = torch.eye(sae.cfg.d_sae, dtype=sae.dtype)
                    zero = sae.decode(torch.zeros(1, sae.cfg.d_sae, dtype=sae.dtype))
                    dirs = (sae.decode(eye) - zero).float()
                    code = torch.rand(3, sae.cfg.d_sae, generator=torch.Generator().manual_seed(0), dtype=sae.dtype)
                    if torch.allclose((sae.decode(code) - zero).float(), code.float() @ dirs, rtol=1e-4, atol=1e-4):
                        self._dirs = dirs
        return self._dirs

    def label(self, local: int) -> str:
        return f"{self.id}:{int(self.indices[local])}"

    def directions(self, model) -> Float[Tensor, "units d_model"] | None:
        """What one unit of activation writes into the residual stream, where that is linear (for the raw logit
        chart); None for hooks with no linear path to the residual stream."""
        with torch.no_grad():
            if self.kind == "feature":
                vecs = self.sae.W_dec.detach().float()[self.indices]
            else:
                vecs = torch.eye(self.width)[self.indices]
            m = MLP_POST.match(self.hook)
            if m:
                return vecs @ model.blocks[int(m.group(1))].mlp.W_out.detach().float()
            if _RESID_SPACE.match(self.hook) and vecs.shape[-1] == model.cfg.d_model:
                return vecs
        return None


class UnitEdit:
    """A TransformerLens hook that sets one unit per batch row to a value (0: zero-ablation) at chosen positions.

    Features are edited in the SAE's code and the change decoded back (x + decode(f') - decode(f)), so the SAE's
    reconstruction error stays in the residual stream: only the unit's own contribution moves. Neurons and directions
    are set in place. `rows` lets a caller that drops finished rows from its batch (a sampler) say which are live.
    `current`, where the caller knows it (the store keeps each example's activations), is the unit's clean value at
    each edited position: with an affine decoder a feature's edit is then one vector per position, no SAE encoding."""

    def __init__(
        self,
        unit_set: UnitSet,
        units: Int[Tensor, " rows"],
        values: Float[Tensor, " rows"],
        positions: Bool[Tensor, "rows pos"] | None = None,
        current: Float[Tensor, "rows pos"] | None = None,
    ):
        self.s, self.units, self.values, self.positions = unit_set, units, values.float(), positions
        self.current = current
        self.rows: Tensor | None = None

    def __call__(self, x: Float[Tensor, "rows pos d"], hook=None) -> Float[Tensor, "rows pos d"]:
        units, values, pos = self.units, self.values, self.positions
        if self.rows is not None:
            units, values = units[self.rows], values[self.rows]
            pos = pos[self.rows] if pos is not None else None
        R, P = x.shape[:2]
        mask = pos[:, :P] if pos is not None else torch.ones(R, P, dtype=torch.bool)
        col = self.s.indices[units][:, None, None].expand(R, P, 1)
        if self.s.kind == "feature":
            dirs = self.s.decoder_directions()
            if dirs is not None and self.current is not None:
                cur = (self.current if self.rows is None else self.current[self.rows])[:, :P].float()
                new = torch.where(mask, values[:, None], cur)
                return x + ((new - cur)[..., None] * dirs[self.s.indices[units]][:, None, :]).to(x.dtype)
            sae = self.s.sae
            f = sae.encode(x.to(sae.dtype))
            f = f.to_dense() if f.is_sparse else f
            cur = f.gather(-1, col).squeeze(-1)
            new = torch.where(mask, values[:, None].to(f.dtype), cur)
            if dirs is not None:  # affine decoder: only the unit's own direction moves
                return x + ((new - cur)[..., None] * dirs[self.s.indices[units]][:, None, :]).to(x.dtype)
            f2 = f.scatter(-1, col, new[..., None])
            return x + (sae.decode(f2) - sae.decode(f)).to(x.dtype)
        new = torch.where(mask, values[:, None].to(x.dtype), x.gather(-1, col).squeeze(-1))
        return x.scatter(-1, col, new[..., None])


def _stop_layer(hooks: Sequence[str], model) -> int | None:
    """Run blocks only up to the deepest hook's own (None: a hook after the blocks, run everything)."""
    layers = []
    for h in hooks:
        m = _BLOCK.match(h)
        if m is None and h not in ("hook_embed", "hook_pos_embed", "hook_tokens"):
            return None
        layers.append(int(m.group(1)) + 1 if m else 0)
    # stop_at_layer = n_layers still runs every block but skips the final norm and the unembedding
    return max(min(max(layers, default=0), model.cfg.n_layers), 1)


def _indices(units: Sequence[int] | Tensor | None, width: int) -> Tensor:
    return (
        torch.arange(width)
        if units is None
        else torch.as_tensor(list(units) if not isinstance(units, Tensor) else units)
    )


def feature_units(model, sae, hook: str | None = None, units=None, id: str = "sae") -> UnitSet:
    """The latents of any SAELens SAE on `hook` (default: the hook its metadata names), checked against the model."""
    hook = hook or getattr(sae.cfg.metadata, "hook_name", None)
    if not hook:
        raise VillesError("the SAE does not name its hook (cfg.json metadata.hook_name): pass hook=")
    width = hook_width(model, hook)  # the SAE trainer's check: one vector per position
    if width != sae.cfg.d_in:
        raise VillesError(
            f"SAE/model mismatch: the SAE reads d_in={sae.cfg.d_in} but hook {hook!r} of this model gives {width}"
        )
    return UnitSet(id, hook, "feature", sae.cfg.d_sae, _indices(units, sae.cfg.d_sae), sae)


def neuron_units(model, layer: int, units=None) -> UnitSet:
    if not 0 <= layer < model.cfg.n_layers:
        raise VillesError(f"layer {layer} out of range: the model has {model.cfg.n_layers} layers")
    hook = f"blocks.{layer}.mlp.hook_post"
    width = hook_width(model, hook)
    return UnitSet(f"mlp{layer}", hook, "neuron", width, _indices(units, width))


def direction_units(model, hook: str, units=None) -> UnitSet:
    width = hook_width(model, hook)
    return UnitSet(hook, hook, "direction", width, _indices(units, width))


def hook_units(model, hook: str, units=None) -> UnitSet:
    """Neurons for an MLP `hook_post`, basis directions for any other hook."""
    m = MLP_POST.match(hook)
    return neuron_units(model, int(m.group(1)), units) if m else direction_units(model, hook, units)


def all_neuron_units(model, units=None) -> list[UnitSet]:
    if getattr(model.cfg, "attn_only", False) or not model.cfg.d_mlp:
        return []
    return [neuron_units(model, layer, units) for layer in range(model.cfg.n_layers)]


def char_tokenizer(model) -> CharTokenizer:
    """The CharTokenizer behind a villes model's Hugging Face tokenizer (same ids, checked: `training.sae`'s)."""
    try:
        return sae_char_tokenizer(model)
    except VillesError as e:
        raise VillesError(f"{e} (or pass tokenizer=)") from None


# --- the collector ---------------------------------------------------------------------------------------------------
@dataclass
class ActBatch:
    """One batch of names: flat activations at the counted positions (row-major: a name's rows are contiguous)."""

    index: int
    names: Int[Tensor, " names"]  # indices into the collector's names
    tokens: Int[Tensor, "names pos"]
    lengths: Int[Tensor, " names"]  # characters of each name = its rows
    starts: Int[Tensor, " names"]  # first row of each name
    row_name: Int[Tensor, " n"]  # local name of each row
    char: Int[Tensor, " n"]  # token id at the row
    prev: Int[Tensor, " n"]  # token id before it (<bos> for a first character)
    pos: Int[Tensor, " n"]  # 1-based character position
    region: Int[Tensor, " n"]  # region id of the row's name
    acts: dict[str, Float[Tensor, "n units"]]  # per unit set id
    neurons: Float[Tensor, "n neurons"] | None  # every MLP neuron, all layers, for correlations
    neuron_sum: Tensor | None = None  # their column sums and sums of squares, filled once per batch by `collect`
    neuron_sumsq: Tensor | None = None
    nonzero: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # (rows, cols, values) per set,
    # where the read gave them (TopK SAEs); any other set's are found from `acts`


class Collector:
    """Streams names through the model once per iteration; see the module docstring."""

    def __init__(
        self,
        model,
        unit_sets: Sequence[UnitSet],
        names: Sequence[str],
        regions: Sequence[str] | None = None,
        tokenizer: CharTokenizer | None = None,
        batch_size: int = 256,
        neurons: bool = True,
    ):
        if not names:
            raise VillesError("no names to collect activations over")
        if batch_size <= 0:
            raise VillesError(f"batch size must be positive, got {batch_size}")
        ids = [s.id for s in unit_sets]
        if len(set(ids)) != len(ids):
            raise VillesError(f"unit set ids must be distinct, got {ids}")
        self.model, self.unit_sets, self.names = model, list(unit_sets), list(names)
        self.tok = tokenizer or char_tokenizer(model)
        for name in self.names:  # fail before any work on a character the model lacks
            self.tok.encode(name)
        if max(map(len, self.names)) + 2 > model.cfg.n_ctx:
            raise VillesError(f"a name is longer than the model's context ({model.cfg.n_ctx - 2} characters)")
        regions = [r or UNKNOWN_REGION for r in (regions or [""] * len(self.names))]
        self.region_names = sorted(set(regions), key=lambda r: (r == UNKNOWN_REGION, -regions.count(r), r))
        rid = {r: i for i, r in enumerate(self.region_names)}
        self.name_region = torch.tensor([rid[r] for r in regions])
        self.batch_size = batch_size
        self.neuron_hooks = [s.hook for s in all_neuron_units(model)] if neurons else []
        self.hooks = sorted({s.hook for s in self.unit_sets} | set(self.neuron_hooks))
        self.stop = _stop_layer(self.hooks, model)
        self.order = sorted(range(len(self.names)), key=lambda i: (len(self.names[i]), i))
        self.max_len = model.cfg.n_ctx - 2  # characters a name can have

    def __len__(self) -> int:
        return math.ceil(len(self.names) / self.batch_size)

    @property
    def n_neurons(self) -> int:
        return len(self.neuron_hooks) * (self.model.cfg.d_mlp or 0)

    @torch.no_grad()
    def __iter__(self) -> Iterator[ActBatch]:
        for bi, start in enumerate(range(0, len(self.names), self.batch_size)):
            idx = torch.tensor(self.order[start : start + self.batch_size])
            tokens = self.tok.batch([self.names[i] for i in idx])
            yield self.run(bi, idx, tokens)

    @torch.no_grad()
    def run(self, bi: int, idx: Int[Tensor, " names"], tokens: Int[Tensor, "names pos"]) -> ActBatch:
        store: dict[str, Tensor] = {}

        def save(x, hook):
            store[hook.name] = x

        self.model.run_with_hooks(
            tokens, fwd_hooks=[(h, save) for h in self.hooks], return_type=None, stop_at_layer=self.stop
        )
        mask = sae_positions(tokens)  # characters only (see "Positions")
        rows, t = mask.nonzero(as_tuple=True)
        lengths = mask.sum(1)
        flat = {h: store[h][mask] for h in self.hooks}  # one gather per hook, shared by the sets reading it
        neurons = torch.cat([flat[h] for h in self.neuron_hooks], 1).float() if self.neuron_hooks else None
        reads = {s.id: s.read_sparse(flat[s.hook]) for s in self.unit_sets}
        return ActBatch(
            index=bi,
            names=idx,
            tokens=tokens,
            lengths=lengths,
            starts=torch.cumsum(lengths, 0) - lengths,
            row_name=rows,
            char=tokens[rows, t],
            prev=tokens[rows, t - 1],
            pos=t,
            region=self.name_region[idx][rows],
            acts={sid: read[0] for sid, read in reads.items()},
            neurons=neurons,
            nonzero={sid: read[1] for sid, read in reads.items() if read[1] is not None},
        )


# --- streaming selections --------------------------------------------------------------------------------------------
def gather_rows(
    acts: Float[Tensor, "n units"], start: Int[Tensor, " m"], length: Int[Tensor, " m"], unit: Int[Tensor, " m"], L: int
) -> Float[Tensor, "m L"]:
    """acts[start + j, unit] for j < length (0 beyond): a name's activations for one unit."""
    j = torch.arange(L)
    valid = j[None] < length[:, None]
    rows = (start[:, None] + j[None]).clamp(max=len(acts) - 1)
    return acts[rows, unit[:, None]] * valid


class _Reservoir:
    """For each group, the `size` entries with the smallest keys offered so far, with the name and the unit's
    activation at each of its characters. Keeping the smallest is associative, so streaming gives exactly the set one
    sort of everything would (top-k: key = -peak; uniform samples: key = a uniform random number), and two groups can
    be merged exactly later (the activation bands, when a unit's range doubles)."""

    FLUSH_AT = 20_000  # candidates buffered before a merge: one merge per many batches, not one per batch

    def __init__(self, groups: int, size: int, length: int):
        self.key = torch.full((groups, size), math.inf, dtype=torch.float64)  # hash keys need more than 24 bits
        self.name = torch.full((groups, size), -1, dtype=torch.long)
        self.vec = torch.zeros(groups, size, length)
        self._pending: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._n_pending = 0

    def threshold(self) -> Float[Tensor, " groups"]:
        """The worst kept key per group (inf while it has room). Buffered candidates are not merged yet, so this
        may be above the exact value: it only lets a few more candidates through, never keeps one out wrongly."""
        return self.key[:, -1]

    def add(self, gid: Tensor, key: Tensor, name: Tensor, vec: Tensor) -> None:
        """Buffer candidates (vectors already gathered, as wide as their batch's longest name: padded with zeros to
        the full length at the merge); merged by `flush`, here once FLUSH_AT are waiting."""
        if len(gid):
            if vec.shape[-1] < self.vec.shape[-1]:
                vec = torch.nn.functional.pad(vec, (0, self.vec.shape[-1] - vec.shape[-1]))
            self._pending.append((gid, key.double(), name, vec))
            self._n_pending += len(gid)
            if self._n_pending >= self.FLUSH_AT:
                self.flush()

    def flush(self) -> None:
        if self._pending:
            gid, key, name, vec = (torch.cat(x) for x in zip(*self._pending, strict=True))
            self._pending, self._n_pending = [], 0
            self.offer(gid, key, name, lambda i: vec[i])

    def offer(self, gid: Tensor, key: Tensor, name: Tensor, vectors) -> None:
        """Candidates: group, key and global name of each; `vectors(i)` gives the activation vectors of the
        candidates at positions i, asked only for those kept (so a flood of candidates costs no gathering)."""
        if len(gid) == 0:
            return
        S = self.key.shape[1]
        touched = torch.unique(gid)
        T = len(touched)
        all_key = torch.cat([self.key[touched].reshape(-1), key.double()])
        all_g = torch.cat([touched.repeat_interleave(S), gid])
        old_slot = torch.cat([torch.arange(S).repeat(T), torch.full((len(gid),), -1)])
        order = torch.sort(all_key, stable=True).indices  # by key, old entries first among equal keys ...
        order = order[torch.sort(all_g[order], stable=True).indices]  # ... then by group
        g_sorted = all_g[order]
        rank = torch.arange(len(order)) - torch.searchsorted(g_sorted, g_sorted)
        ok = (rank < S) & torch.isfinite(all_key[order])
        keep, kr = order[ok], rank[ok]
        kg = all_g[keep]
        tpos = torch.searchsorted(touched, kg)
        nk = torch.full((T, S), math.inf, dtype=torch.float64)
        nn = torch.full((T, S), -1, dtype=torch.long)
        nv = torch.zeros(T, S, self.vec.shape[-1])
        nk[tpos, kr] = all_key[keep]
        slot = old_slot[keep]
        old = slot >= 0
        nn[tpos[old], kr[old]] = self.name[kg[old], slot[old]]
        nv[tpos[old], kr[old]] = self.vec[kg[old], slot[old]]
        c = keep[~old] - T * S  # candidate positions
        nn[tpos[~old], kr[~old]] = name[c]
        nv[tpos[~old], kr[~old]] = vectors(c)
        self.key[touched], self.name[touched], self.vec[touched] = nk, nn, nv

    def regroup(self, groups: Tensor, new_groups: Tensor) -> None:
        """Move the entries of `groups` into `new_groups` (several may share one), keeping the smallest keys."""
        self.flush()
        S = self.key.shape[1]
        key, name, vec = self.key[groups].reshape(-1), self.name[groups].reshape(-1), self.vec[groups].flatten(0, 1)
        gid = new_groups.repeat_interleave(S)
        self.key[groups], self.name[groups], self.vec[groups] = math.inf, -1, 0.0
        ok = torch.isfinite(key)
        vec_ok = vec[ok]
        self.offer(gid[ok], key[ok], name[ok], lambda i: vec_ok[i])


def _offer_pairs(
    res: _Reservoir,
    gid: Int[Tensor, " m"],
    key: Float[Tensor, " m"],
    j: Int[Tensor, " m"],
    u: Int[Tensor, " m"],
    b: ActBatch,
    acts: Float[Tensor, "n units"],
) -> None:
    """Offer (name j of the batch, unit u) pairs in groups gid; only those that could enter are kept."""
    ok = key < res.threshold()[gid]  # after the first batches, few pass: gathering their vectors now is cheap
    gid, key, j, u = gid[ok], key[ok], j[ok], u[ok]
    width = min(b.tokens.shape[1], res.vec.shape[-1])  # the batch's longest name fits (<bos>, <eos> to spare)
    res.add(gid, key, b.names[j], gather_rows(acts, b.starts[j], b.lengths[j], u, width))


_P = 2_147_483_647  # 2^31 - 1


def uniform_key(name: Int[Tensor, " m"], unit: Int[Tensor, " m"], salt: int) -> Float[Tensor, " m"]:
    """A uniform number in [0, 1) that depends only on (name, unit, salt): samples drawn with it do not depend on
    batching, order or which code path saw the pair. Multiplications modulo a prime mixed with xor-shifts; every
    intermediate stays below 2^48, so int64 never overflows."""
    x = (name.long() * 40503 + unit.long() * 9973 + (salt * 7919) % _P) % _P
    for m, shift in ((48271, 11), (69621, 13), (16807, 7)):
        x = (x * m) % _P
        x = x ^ (x >> shift)
    return (x % _P).double() / _P


def _coarsen(counts: Float[Tensor, "units bins"], units: Tensor, factor: Tensor) -> None:
    """Merge each unit's bins by `factor` (a power of two): old bin i lands in new bin i // factor. The old edges
    include every new edge, so the counts stay exact."""
    K = counts.shape[1]
    for f in factor.unique().tolist():
        sel = units[factor == f]
        counts[sel] = torch.zeros(len(sel), K).index_add_(1, torch.arange(K) // int(f), counts[sel])


def _pow2_above(x: Float[Tensor, " units"]) -> Float[Tensor, " units"]:
    """The smallest power of two strictly above x (0 where x <= 0): a range that does not depend on batch order."""
    r = torch.exp2(torch.floor(torch.log2(x.clamp(min=1e-30))) + 1)
    return torch.where(x > 0, r, torch.zeros_like(x))


# --- the store -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreSettings:
    split: str = "all"
    batch_size: int = 256  # names per forward (small batches keep the working set in cache)
    top_k: int = 20  # top (and, for signed units, bottom) names
    n_bands: int = 10  # equal-width activation intervals of (0, range]
    per_band: int = 4  # names sampled per interval
    n_random: int = 10  # names sampled uniformly among those where the unit fires
    hist_bins: int = 64  # per sign, over (0, range]
    dense_threshold: float = 0.1  # a unit active on more than this fraction of characters is flagged dense
    corr_every: int = 8  # correlations of dense units use every n-th batch (sparse features use all)
    seed: int = 0

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("split", "seed"):
                continue
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise VillesError(f"store setting {f.name} must be positive, got {v}")


GROUPINGS = ("char", "prev", "pos", "region")


@dataclass(eq=False)
class UnitStats:
    """Everything collected for one unit set. Groupings: char / prev (token ids, [vocab, U]), pos (1-based character
    position, [n_ctx, U]), region ([regions, U]). Per grouping: `count_*` positions (the corpus baseline, the same for
    every unit), `sum_*` activations, `active_*` positions where the unit is > 0; `sumsq_char` gives variances by
    character and `mass_region` sums the positive part (activation mass).

    Ranges. `range_pos` is the smallest power of two above the unit's maximum (`range_neg` the same for minus its
    minimum, signed units only). `hist_pos[u, i]` counts values in [i, i+1) * range_pos / bins (features: non-zero
    values only), `hist_neg[u, i]` values in (-(i+1), -i] * range_neg / bins. Band b of (0, range_pos] holds the
    names whose peak lies in [b, b+1) * range_pos / n_bands: `band_count` of them, a uniform sample in `bands`
    (group u * n_bands + b). Being powers of two, the ranges and so every count are independent of batch order."""

    unit_set: UnitSet
    n_tokens: int = 0
    n_names: int = 0
    count_char: Tensor = None
    count_prev: Tensor = None
    count_pos: Tensor = None
    count_region: Tensor = None
    sum_char: Tensor = None
    sum_prev: Tensor = None
    sum_pos: Tensor = None
    sum_region: Tensor = None
    active_char: Tensor = None
    active_prev: Tensor = None
    active_pos: Tensor = None
    active_region: Tensor = None
    sumsq_char: Tensor = None
    mass_region: Tensor = None
    max: Tensor = None  # [U] over counted positions
    min: Tensor = None
    active_names: Tensor = None  # [U] names with a positive peak
    top: _Reservoir = None  # groups = units, key = -peak
    bottom: _Reservoir | None = None  # signed units: key = lowest value
    range_pos: Tensor = None
    range_neg: Tensor | None = None
    hist_pos: Tensor = None
    hist_neg: Tensor | None = None
    band_count: Tensor = None
    bands: _Reservoir = None
    random: _Reservoir = None  # groups = units, uniform among names with a positive peak
    corr: dict[str, Tensor] = field(default_factory=dict)  # cross-moments with every MLP neuron

    def __len__(self) -> int:
        return len(self.unit_set)

    @property
    def active(self) -> Float[Tensor, " units"]:
        return self.active_char.sum(0)

    @property
    def density(self) -> Float[Tensor, " units"]:
        return self.active / max(self.n_tokens, 1)

    @property
    def mean(self) -> Float[Tensor, " units"]:
        return self.sum_char.sum(0) / max(self.n_tokens, 1)

    @property
    def std(self) -> Float[Tensor, " units"]:
        m = self.mean
        return (self.sumsq_char.sum(0) / max(self.n_tokens, 1) - m * m).clamp(min=0).sqrt()

    def dead(self) -> Bool[Tensor, " units"]:
        return self.active == 0

    def dense(self, threshold: float) -> Bool[Tensor, " units"]:
        return self.density > threshold


class ActivationStore:
    """The collected statistics of several unit sets over one list of names (see the module docstring)."""

    def __init__(
        self,
        stats: dict[str, UnitStats],
        names: list[str],
        region_names: list[str],
        name_region: Tensor,
        vocab: list[str],
        settings: StoreSettings,
        n_neurons: int,
    ):
        self.stats, self.names, self.region_names = stats, names, region_names
        self.name_region, self.vocab, self.settings, self.n_neurons = name_region, vocab, settings, n_neurons

    def __getitem__(self, set_id: str) -> UnitStats:
        return self.stats[set_id]

    # persistence: one safetensors file of every tensor plus one JSON of the rest -----------------------------------
    def save(self, folder: Path | str) -> None:
        from training.checkpoint import atomic_save_tensors, atomic_write_json

        folder = Path(folder)
        tensors, meta = {"name_region": self.name_region}, {}
        for sid, st in self.stats.items():
            s = st.unit_set
            meta[sid] = {
                "hook": s.hook,
                "kind": s.kind,
                "width": s.width,
                "n_tokens": st.n_tokens,
                "n_names": st.n_names,
            }
            tensors[f"{sid}/indices"] = s.indices
            for k, v in vars(st).items():
                if isinstance(v, Tensor):
                    tensors[f"{sid}/{k}"] = v
                elif isinstance(v, _Reservoir):
                    for part in ("key", "name", "vec"):
                        tensors[f"{sid}/{k}.{part}"] = getattr(v, part)
            for k, v in st.corr.items():
                tensors[f"{sid}/corr.{k}"] = v
        atomic_save_tensors(tensors, folder / "store.safetensors")
        atomic_write_json(
            folder / "store.json",
            {
                "format": STORE_FORMAT,
                "sets": meta,
                "names": self.names,
                "region_names": self.region_names,
                "vocab": self.vocab,
                "settings": asdict(self.settings),
                "n_neurons": self.n_neurons,
            },
        )

    @classmethod
    def load(cls, folder: Path | str, saes: dict[str, Any] | None = None) -> ActivationStore:
        """A saved store; pass the SAEs (by set id) to get feature sets that can read and edit again."""
        from training.checkpoint import load_tensors, read_json

        folder = Path(folder)
        info = read_json(folder / "store.json")
        if info.get("format") != STORE_FORMAT:
            raise VillesError(f"{folder} holds no activation store")
        t = load_tensors(folder / "store.safetensors")
        stats = {}
        for sid, m in info["sets"].items():
            s = UnitSet(sid, m["hook"], m["kind"], m["width"], t[f"{sid}/indices"], (saes or {}).get(sid))
            st = UnitStats(s, m["n_tokens"], m["n_names"])
            for key, v in t.items():
                if not key.startswith(f"{sid}/") or key == f"{sid}/indices":
                    continue
                k = key[len(sid) + 1 :]
                if k.startswith("corr."):
                    st.corr[k[5:]] = v
                elif "." in k:
                    name, part = k.split(".")
                    if getattr(st, name, None) is None:
                        setattr(st, name, _Reservoir(1, 1, 1))
                    setattr(getattr(st, name), part, v)
                else:
                    setattr(st, k, v)
            stats[sid] = st
        return cls(
            stats,
            info["names"],
            info["region_names"],
            t["name_region"],
            info["vocab"],
            StoreSettings(**info["settings"]),
            info["n_neurons"],
        )


STORE_FORMAT = "villes-activation-store-1"


class _Accumulator:
    """One unit set's statistics, updated batch by batch."""

    def __init__(
        self, s: UnitSet, vocab: int, n_ctx: int, regions: int, length: int, cfg: StoreSettings, n_neurons: int
    ):
        U = len(s)
        z = lambda *shape: torch.zeros(*shape)  # noqa: E731
        self.s, self.cfg, self.L = s, cfg, length
        st = self.st = UnitStats(s)
        st.count_char, st.count_prev, st.count_pos, st.count_region = z(vocab), z(vocab), z(n_ctx), z(regions)
        st.sum_char, st.sum_prev, st.sum_pos, st.sum_region = z(vocab, U), z(vocab, U), z(n_ctx, U), z(regions, U)
        st.active_char, st.active_prev = z(vocab, U), z(vocab, U)
        st.active_pos, st.active_region = z(n_ctx, U), z(regions, U)
        st.sumsq_char, st.mass_region = z(vocab, U), z(regions, U)
        st.max, st.min = torch.full((U,), -math.inf), torch.full((U,), math.inf)
        st.active_names = z(U)
        st.top = _Reservoir(U, cfg.top_k, length)
        st.range_pos, st.hist_pos = z(U), z(U, cfg.hist_bins)
        if s.signed:
            st.bottom = _Reservoir(U, cfg.top_k, length)
            st.range_neg, st.hist_neg = z(U), z(U, cfg.hist_bins)
        st.band_count = z(U, cfg.n_bands)
        st.bands = _Reservoir(U * cfg.n_bands, cfg.per_band, length)
        st.random = _Reservoir(U, cfg.n_random, length)
        if n_neurons:
            st.corr = {"n": z(()), "xy": z(U, n_neurons), "x": z(U), "xx": z(U), "y": z(n_neurons), "yy": z(n_neurons)}

    def update(self, b: ActBatch, sparse: bool | None = None) -> None:
        st, a, U = self.st, b.acts[self.s.id], len(self.s)
        st.n_tokens += len(a)
        st.n_names += len(b.names)
        for g in GROUPINGS:
            getattr(st, f"count_{g}").index_add_(0, getattr(b, g), torch.ones(len(a)))
        sparse = self.s.kind == "feature" if sparse is None else sparse
        low = None
        if sparse:  # (name, unit) pairs where the unit fires, with the name's peak: no dense [names, units] work
            nz = b.nonzero.get(self.s.id)  # (rows, cols, values)
            if nz is None:
                r, c = a.nonzero(as_tuple=True)
                nz = (r, c, a[r, c])
            j, u, peak = self._groups_sparse(b, a, nz)
            batch_max = torch.zeros(U).scatter_reduce_(0, u, peak, "amax")
        else:
            nz = None
            peaks = self._groups_dense(b, a)
            batch_max = peaks.amax(0)
            j, u = (peaks > 0).nonzero(as_tuple=True)
            peak = peaks[j, u]
            if self.s.signed:
                low = torch.segment_reduce(a, "min", lengths=b.lengths, axis=0)
        st.max = torch.maximum(st.max, batch_max)
        st.min = torch.minimum(st.min, low.amin(0)) if low is not None else st.min.clamp(max=0)
        st.active_names += torch.bincount(u, minlength=U)
        self._grow_ranges(batch_max, None if low is None else -low.amin(0))
        self._histogram(a, nz)
        if sparse:
            _offer_pairs(st.top, u, -peak, j, u, b, a)
        else:  # only a batch's k best names (and those tied with them) can enter a unit's top k: offer those alone
            k = min(self.cfg.top_k, len(peaks))
            jt, ut = ((peaks >= peaks.topk(k, dim=0).values[-1]) & (peaks > 0)).nonzero(as_tuple=True)
            _offer_pairs(st.top, ut, -peaks[jt, ut], jt, ut, b, a)
            if low is not None:
                jl, ul = ((low <= low.topk(k, dim=0, largest=False).values[-1]) & (low < 0)).nonzero(as_tuple=True)
                _offer_pairs(st.bottom, ul, low[jl, ul], jl, ul, b, a)
        nb = self.cfg.n_bands
        scale = torch.where(st.range_pos > 0, nb / st.range_pos.clamp(min=1e-30), torch.zeros_like(st.range_pos))
        band = u * nb + (peak * scale[u]).long().clamp_(0, nb - 1)
        st.band_count.view(-1).index_add_(0, band, torch.ones(len(band)))
        name, unit = b.names[j], self.s.indices[u]
        _offer_pairs(st.bands, band, uniform_key(name, unit, 2 * self.cfg.seed + 1), j, u, b, a)
        _offer_pairs(st.random, u, uniform_key(name, unit, 2 * self.cfg.seed + 2), j, u, b, a)
        if st.corr and b.neurons is not None:
            self._correlate(b, a, nz)

    def finish(self) -> None:
        """Merge the candidates still buffered in the reservoirs."""
        for res in (self.st.top, self.st.bottom, self.st.bands, self.st.random):
            if res is not None:
                res.flush()

    def _groups_dense(self, b: ActBatch, a: Tensor) -> Float[Tensor, "names units"]:
        st = self.st
        act = (a > 0).float()
        for g in GROUPINGS:
            ids = getattr(b, g)
            getattr(st, f"sum_{g}").index_add_(0, ids, a)
            getattr(st, f"active_{g}").index_add_(0, ids, act)
        st.sumsq_char.index_add_(0, b.char, a * a)
        st.mass_region.index_add_(0, b.region, a.clamp(min=0) if self.s.signed else a)
        return torch.segment_reduce(a, "max", lengths=b.lengths, axis=0)

    def _groups_sparse(self, b: ActBatch, a: Tensor, nz) -> tuple[Tensor, Tensor, Tensor]:
        """The same sums from the non-zero entries only (an SAE's codes are mostly zeros); returns the (name, unit)
        pairs where the unit fires, with the name's peak."""
        st, U = self.st, a.shape[1]
        r, c, v = nz
        act = (v > 0).float()
        for g in GROUPINGS:
            flat = getattr(b, g)[r] * U + c
            getattr(st, f"sum_{g}").view(-1).index_add_(0, flat, v)
            getattr(st, f"active_{g}").view(-1).index_add_(0, flat, act)
        st.sumsq_char.view(-1).index_add_(0, b.char[r] * U + c, v * v)
        st.mass_region.view(-1).index_add_(0, b.region[r] * U + c, v.clamp(min=0))
        fires = v > 0
        pair, inv = torch.unique(b.row_name[r[fires]] * U + c[fires], return_inverse=True)
        peak = torch.zeros(len(pair)).scatter_reduce_(0, inv, v[fires], "amax", include_self=False)
        return pair // U, pair % U, peak

    def _grow_ranges(self, top: Tensor, bottom: Tensor | None) -> None:
        """Double a unit's ranges until its new values fit, merging its bins and bands exactly (see UnitStats)."""
        st = self.st
        for side, new_max in (("pos", top), ("neg", bottom)):
            if new_max is None:
                continue
            r = getattr(st, f"range_{side}")
            want = torch.maximum(r, _pow2_above(new_max))
            grow = (r > 0) & (want > r)
            if bool(grow.any()):
                units = grow.nonzero().flatten()
                factor = torch.round(want[units] / r[units]).long()  # a power of two
                _coarsen(getattr(st, f"hist_{side}"), units, factor)
                if side == "pos":
                    _coarsen(st.band_count, units, factor)
                    nb = self.cfg.n_bands
                    for f in factor.unique().tolist():
                        sel = units[factor == f]
                        old = (sel[:, None] * nb + torch.arange(nb)).reshape(-1)
                        new = (sel[:, None] * nb + torch.arange(nb) // int(f)).reshape(-1)
                        st.bands.regroup(old, new)
            setattr(st, f"range_{side}", want)

    def _histogram(self, a: Tensor, nz) -> None:
        st, B = self.st, self.cfg.hist_bins
        U = a.shape[1]
        sp = torch.where(st.range_pos > 0, B / st.range_pos.clamp(min=1e-30), torch.zeros_like(st.range_pos))
        if nz is not None:  # features: the non-zero values
            _, c, v = nz
            pos = v > 0
            c, v = c[pos], v[pos]
            bins = (v * sp[c]).long().clamp_(max=B - 1)
            st.hist_pos.view(-1).index_add_(0, c * B + bins, torch.ones(len(v)))
            return
        if st.range_neg is None:
            a = a.clamp(min=0)
            sn = torch.zeros_like(sp)
        else:
            sn = torch.where(st.range_neg > 0, -B / st.range_neg.clamp(min=1e-30), torch.zeros_like(sp))
        neg = a < 0
        # one [U, 2B] histogram: bins B-1 .. 0 for negative values (mirrored), B .. 2B-1 for the rest
        t = torch.where(neg, a * sn, a * sp).to(torch.int32).clamp_(max=B - 1)
        idx = torch.where(neg, (B - 1) - t, B + t)
        idx += torch.arange(U, dtype=torch.int32) * (2 * B)
        h = torch.bincount(idx.view(-1), minlength=U * 2 * B).view(U, 2 * B).float()
        st.hist_pos += h[:, B:]
        if st.hist_neg is not None:
            st.hist_neg += h[:, :B].flip(1)

    def _correlate(self, b: ActBatch, a: Tensor, nz) -> None:
        """Cross-moments with every MLP neuron: on all rows for sparse features (a sparse product), on every
        corr_every-th batch for dense units (a dense [U, n] x [n, neurons] product on every batch would cost as much
        as the forward pass)."""
        c, y = self.st.corr, b.neurons
        if nz is not None:
            r, col, v = nz
            m = torch.sparse_coo_tensor(torch.stack([col, r]), v, (a.shape[1], len(a)), check_invariants=False)
            c["xy"] += torch.sparse.mm(m, y)
            c["x"].index_add_(0, col, v)
            c["xx"].index_add_(0, col, v * v)
        elif b.index % self.cfg.corr_every == 0:
            c["xy"] += a.T @ y
            c["x"] += a.sum(0)
            c["xx"] += (a * a).sum(0)
        else:
            return
        c["n"] += len(a)
        c["y"] += b.neuron_sum
        c["yy"] += b.neuron_sumsq


def collect(
    model,
    unit_sets: Sequence[UnitSet],
    names: Sequence[str],
    regions: Sequence[str] | None = None,
    settings: StoreSettings = StoreSettings(),
    tokenizer: CharTokenizer | None = None,
    progress: bool = True,
    pipeline: bool | None = None,
) -> ActivationStore:
    """One pass of a `Collector` over `names` -> an ActivationStore (see the module docstring). With `pipeline` (the
    default where there is more than one core) the forward passes run in a background thread, a batch or two ahead
    of the statistics (`prefetch`); the batches and so the store are the same either way."""
    settings.validate()
    col = Collector(model, unit_sets, names, regions, tokenizer, settings.batch_size)
    accs = [
        _Accumulator(s, model.cfg.d_vocab, model.cfg.n_ctx, len(col.region_names), col.max_len, settings, col.n_neurons)
        for s in col.unit_sets
    ]

    def batches() -> Iterator[ActBatch]:
        for b in col:
            if b.neurons is not None:  # shared by every set's correlations
                b.neuron_sum, b.neuron_sumsq = b.neurons.sum(0), (b.neurons * b.neurons).sum(0)
            yield b

    if pipeline is None:
        pipeline = (os.cpu_count() or 1) > 1
    threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    try:
        if pipeline:  # two threads of work: intra-op threads beyond the cores would only spin
            torch.set_num_threads(max(1, threads // 2))
        stream = prefetch(batches()) if pipeline else batches()
        for b in tqdm(stream, total=len(col), desc="activations", disable=not progress, dynamic_ncols=True):
            for acc in accs:
                acc.update(b)
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    for acc in accs:
        acc.finish()
    for acc in accs:  # a NaN or an infinity anywhere reaches the sums: one cheap check at the end
        if not bool(torch.isfinite(acc.st.sumsq_char).all()):
            raise VillesError(f"{acc.s.id}: the activations hold NaN or infinite values")
    return ActivationStore(
        {a.s.id: a.st for a in accs},
        col.names,
        col.region_names,
        col.name_region,
        col.tok.itos,
        settings,
        col.n_neurons,
    )


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """The items of an iterator, produced in a background thread up to `depth` ahead and yielded in order: a batch's
    forward pass overlaps the statistics of the one before (torch releases the GIL inside its kernels). An error in
    the producer is raised here; closing this generator early stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put((None, x)):
                    return
            put((None, end))
        except BaseException as e:  # re-raised in the consumer
            put((e, None))

    worker = threading.Thread(target=work, name="villes-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            err, x = q.get()
            if err is not None:
                raise err
            if x is end:
                return
            yield x
    finally:
        stop.set()
        worker.join()


def pearson(corr: dict[str, Tensor]) -> Float[Tensor, "units neurons"]:
    """Pearson correlation from accumulated cross-moments (0 where a side is constant)."""
    n = corr["n"].clamp(min=1)
    mx, my = corr["x"] / n, corr["y"] / n
    cov = corr["xy"] / n - mx[:, None] * my[None]
    sx = (corr["xx"] / n - mx * mx).clamp(min=0).sqrt()
    sy = (corr["yy"] / n - my * my).clamp(min=0).sqrt()
    denom = sx[:, None] * sy[None]
    return torch.where(denom > 1e-12, cov / denom.clamp(min=1e-12), torch.zeros_like(cov))
