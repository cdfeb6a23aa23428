"""Steering hooks: clamp, add, scale or ablate an SAE feature, an MLP neuron or any direction while the model runs,
and measure what the intervention does to generated names.

Every factory returns a plain list of `(hook_name, fn)` pairs, so steering drops into any TransformerLens workflow:

    hooks = clamp_feature(model, sae, 142, 3.0) + add_direction(model, "blocks.0.hook_resid_pre", d, 2.0)
    with model.hooks(fwd_hooks=hooks): ...           # or model.run_with_hooks(tokens, fwd_hooks=hooks)
    sample_names(model, tok, settings, fwd_hooks=hooks)  # fires at every generation step

Lists compose by concatenation: hooks at the same point run in list order, each on the previous one's output.

Units. Each intervention edits one scalar coordinate `c` per position and writes the change back:
- SAE feature i: c is its activation (`sae.encode`); the change goes through `sae.decode`, so "add a" adds
  a × W_dec[i] for a linear decoder. Error-preserving by default: the output is x + decode(f') - decode(f), i.e. the
  part of x that the SAE does not reconstruct is kept (as the reference project does); when nothing changes the
  output is x bit for bit. `keep_error=False` splices the bare reconstruction decode(f') instead.
- neuron i of a hook (e.g. `blocks.0.mlp.hook_post`): c is x[..., i].
- direction d: c = x·d / d·d (x's coordinate along d, in units of d), so "add a" adds a × d and "clamp v" moves x
  along d only, until its coordinate is v.

Positions. During cached generation a hook sees only the newest position(s) ([batch, new_pos, ...]), so "position 3"
or "right after a hyphen" cannot be read from the tensor's own index. A position-restricted hook therefore brings
small reader hooks that recover, in the same forward pass, the absolute position of every row (by matching the
output of `hook_pos_embed` against the rows of W_pos, which is exact; or, for rotary models, from the key length at
block 0's attention scores) and its current character (matching `hook_embed` against W_E). Nothing is carried over
between calls, so the same hooks are exact in a full forward, in a cached step, and in anyone's generate loop; a
stamp bumped at `hook_embed` makes a hook that would read a stale position fail loudly instead.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from training.errors import VillesError

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from training.data import Corpus
    from training.tokenizer import CharTokenizer

Hook = tuple[str, Callable]
OPS = ("clamp", "add", "scale", "ablate")


# --- what to do to one coordinate -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """clamp: c = value; add: c + value; scale: c × value; ablate: c = value (0: zero ablation, a mean: mean
    ablation)."""

    op: str
    value: float = 0.0

    def __post_init__(self):
        if self.op not in OPS:
            raise VillesError(f"unknown steering operation {self.op!r}: choose one of {', '.join(OPS)}")
        check_finite(self.value, f"{self.op} strength")

    def apply(self, c: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        if self.op == "add":
            return c + self.value
        if self.op == "scale":
            return c * self.value
        return torch.full_like(c, self.value)  # clamp, ablate

    def is_identity(self) -> bool:
        return (self.op == "add" and self.value == 0) or (self.op == "scale" and self.value == 1)


def check_finite(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise VillesError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise VillesError(f"{what} must be finite, got {value!r}")
    return v


# --- where: which positions an intervention touches -------------------------------------------------------------------
@dataclass(frozen=True)
class Where:
    """The positions a hook acts on; conditions combine with AND; `Where()` is every position.

    Position p holds token p (0 is <bos>) and predicts token p + 1, so `first=3` steers the first three letters, and
    `after="-"` steers the letter written right after a hyphen."""

    positions: tuple[int, ...] | None = None  # absolute positions
    first: int | None = None  # only positions < first ("early")
    after: str | None = None  # only positions whose current character is one of these

    @property
    def everywhere(self) -> bool:
        return self.positions is None and self.first is None and self.after is None

    def check(self, n_ctx: int, tokenizer_chars: Sequence[str] | None = None) -> None:
        for p in self.positions or ():
            if not isinstance(p, int) or not 0 <= p < n_ctx:
                raise VillesError(f"position {p} is outside the context (0..{n_ctx - 1})")
        if self.positions is not None and not self.positions:
            raise VillesError("an empty position set would steer nothing")
        if self.first is not None and not (isinstance(self.first, int) and 1 <= self.first <= n_ctx):
            raise VillesError(f"first={self.first} is outside the context (1..{n_ctx})")
        if self.after is not None:
            if not self.after:
                raise VillesError("after= needs at least one character")
            if tokenizer_chars is not None:
                bad = sorted(set(self.after) - set(tokenizer_chars))
                if bad:
                    raise VillesError(f"after= character {bad[0]!r} is not in the model's vocabulary")


class _Context:
    """Absolute positions and current tokens of the rows a hook sees, recovered inside the same forward pass."""

    def __init__(self, model: HookedTransformer, where: Where, hook_name: str):
        self.where = where
        self.stamp = 0  # bumped at hook_embed: one value per forward pass
        self.pos_stamp = self.tok_stamp = -1
        self.positions: Tensor | None = None
        self.tokens: Tensor | None = None
        self.need_pos = where.positions is not None or where.first is not None
        self.need_tok = where.after is not None
        self.hook_name = hook_name
        self.rotary = model.cfg.positional_embedding_type not in ("standard", "shortformer")
        self.W_E = model.W_E.detach()
        self.W_pos = None if self.rotary else model.W_pos.detach()
        if where.after is not None:
            tok = model.tokenizer
            ids = [tok.convert_tokens_to_ids(ch) for ch in where.after] if tok is not None else None
            if ids is None or any(i is None or i == getattr(tok, "unk_token_id", -1) for i in ids):
                raise VillesError("after= needs a model with a character tokenizer that knows these characters")
            self.after_ids = torch.tensor(ids)
        if self.need_pos and hook_name in self._before_positions(model):
            raise VillesError(
                f"a position-restricted hook at {hook_name!r} fires before the model's positions are known: "
                "choose a later hook (e.g. blocks.0.hook_resid_pre)"
            )

    def _before_positions(self, model) -> set[str]:
        if not self.rotary:
            return {"hook_embed"}
        early = {"hook_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale", "blocks.0.ln1.hook_normalized"}
        early |= {f"blocks.0.attn.hook_{s}" for s in ("q", "k", "v", "rot_q", "rot_k")}
        return early

    @staticmethod
    def _nearest_row(x: Float[Tensor, "... d"], table: Float[Tensor, "rows d"]) -> Int[Tensor, "..."]:
        # x is a row of `table` (an embedding lookup): x·w - |w|²/2 = (|x|² - |x - w|²)/2 peaks exactly at w = x
        scores = x.float() @ table.float().T - 0.5 * (table.float() ** 2).sum(-1)
        return scores.argmax(-1)

    def hooks(self) -> list[Hook]:
        def on_embed(x, hook):
            self.stamp += 1
            if self.need_tok:
                self.tokens = self._nearest_row(x, self.W_E)
                self.tok_stamp = self.stamp

        out: list[Hook] = [("hook_embed", on_embed)]
        if self.need_pos and not self.rotary:

            def on_pos(x, hook):
                self.positions = self._nearest_row(x, self.W_pos)
                self.pos_stamp = self.stamp

            out.append(("hook_pos_embed", on_pos))
        elif self.need_pos:

            def on_scores(scores, hook):  # [batch, head, query_pos, key_pos]: the cache holds key_pos - query_pos
                q, k = scores.shape[-2], scores.shape[-1]
                self.positions = (torch.arange(q, device=scores.device) + (k - q)).expand(scores.shape[0], q)
                self.pos_stamp = self.stamp

            out.append(("blocks.0.attn.hook_attn_scores", on_scores))
        return out

    def mask(self, x: Tensor) -> Bool[Tensor, "batch pos"]:
        batch, pos = x.shape[0], x.shape[1]
        m = torch.ones(batch, pos, dtype=torch.bool, device=x.device)
        if self.need_pos:
            if self.pos_stamp != self.stamp or self.positions is None or self.positions.shape != (batch, pos):
                raise VillesError(f"position-restricted hook at {self.hook_name!r} ran before its positions were read")
            p = self.positions.to(x.device)
            if self.where.first is not None:
                m &= p < self.where.first
            if self.where.positions is not None:
                m &= torch.isin(p, torch.tensor(self.where.positions, device=x.device))
        if self.need_tok:
            if self.tok_stamp != self.stamp or self.tokens is None or self.tokens.shape != (batch, pos):
                raise VillesError(f"character-restricted hook at {self.hook_name!r} ran before its tokens were read")
            m &= torch.isin(self.tokens.to(x.device), self.after_ids.to(x.device))
        return m


def _context(model, where: Where | None, hook_name: str) -> _Context | None:
    if where is None or where.everywhere:
        return None
    chars = None
    if getattr(model, "tokenizer", None) is not None:
        chars = [t for t in model.tokenizer.get_vocab() if len(t) == 1]
    where.check(model.cfg.n_ctx, chars)
    return _Context(model, where, hook_name)


def _expand(mask: Bool[Tensor, "batch pos"], like: Tensor) -> Bool[Tensor, "..."]:
    return mask.reshape(mask.shape + (1,) * (like.ndim - 2))


# --- checks on the model side -----------------------------------------------------------------------------------------
def hook_shape(model: HookedTransformer, hook_name: str) -> tuple[int, ...]:
    """The trailing shape (after batch and position) of a hook's activation, from one one-token forward pass."""
    if hook_name not in model.hook_dict:
        raise VillesError(f"unknown hook {hook_name!r}: not a hook point of this model")
    seen: list[tuple[int, ...]] = []

    def grab(x, hook):
        seen.append(tuple(x.shape[2:]))

    with torch.no_grad():
        model.run_with_hooks(torch.ones(1, 1, dtype=torch.long), fwd_hooks=[(hook_name, grab)])
    if not seen:
        raise VillesError(f"hook {hook_name!r} does not fire in a forward pass")
    return seen[0]


def _check_index(i, size: int, what: str) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise VillesError(f"{what} index must be an integer, got {i!r}")
    if not 0 <= i < size:
        raise VillesError(f"{what} index {i} is out of range (0..{size - 1})")
    return i


def _edits(edits: Mapping[int, Edit] | Edit, index: int | None = None) -> dict[int, Edit]:
    if isinstance(edits, Edit):
        return {index: edits}
    if not edits:
        raise VillesError("no edit given")
    return dict(edits)


# --- SAE features -----------------------------------------------------------------------------------------------------
def sae_hook_name(sae: SAE, hook_name: str | None = None) -> str:
    name = hook_name or sae.cfg.metadata.hook_name
    if not name:
        raise VillesError("the SAE does not name its hook (cfg.metadata.hook_name): pass hook_name=")
    return name


def _stateful_norm(sae: SAE) -> bool:
    # these normalizations stash per-input statistics in encode and consume them in decode
    return sae.cfg.normalize_activations in ("layer_norm", "constant_norm_rescale")


def feature_hooks(
    model: HookedTransformer,
    sae: SAE,
    edits: Mapping[int, Edit],
    where: Where | None = None,
    keep_error: bool = True,
    hook_name: str | None = None,
) -> list[Hook]:
    """Edit several features of one SAE at its hook (one encode for all of them)."""
    name = sae_hook_name(sae, hook_name)
    shape = hook_shape(model, name)
    if shape[-1:] != (sae.cfg.d_in,):
        raise VillesError(f"SAE/model mismatch: the SAE reads d_in={sae.cfg.d_in} but hook {name!r} gives {shape}")
    edits = _edits(edits)
    for i in edits:
        _check_index(i, sae.cfg.d_sae, "feature")
    ctx = _context(model, where, name)
    items = sorted(edits.items())
    idx = torch.tensor([i for i, _ in items])

    def edit(f: Tensor, m: Tensor | None) -> Tensor:
        cols = torch.stack([e.apply(f[..., i]) for i, e in items], dim=-1)
        if m is not None:
            cols = torch.where(_expand(m, cols), cols, f[..., idx])
        f = f.clone()
        f[..., idx] = cols
        return f

    def fn(x: Float[Tensor, "batch pos d_in"], hook) -> Float[Tensor, "batch pos d_in"]:
        m = ctx.mask(x) if ctx else None
        if m is not None and not m.any():
            return x
        f = sae.encode(x)
        recon = sae.decode(f)
        if _stateful_norm(sae):
            f = sae.encode(x)
        steered = sae.decode(edit(f, m))
        if keep_error:
            return (x + (steered - recon)).to(x.dtype)
        steered = steered.to(x.dtype)
        return steered if m is None else torch.where(_expand(m, x), steered, x)

    return [*(ctx.hooks() if ctx else []), (name, fn)]


def clamp_feature(model, sae, index: int, value: float, **kw) -> list[Hook]:
    return feature_hooks(model, sae, {index: Edit("clamp", value)}, **kw)


def add_feature(model, sae, index: int, alpha: float, **kw) -> list[Hook]:
    """Add alpha × the feature's decoder direction (through the SAE's decoder)."""
    return feature_hooks(model, sae, {index: Edit("add", alpha)}, **kw)


def scale_feature(model, sae, index: int, factor: float, **kw) -> list[Hook]:
    return feature_hooks(model, sae, {index: Edit("scale", factor)}, **kw)


def ablate_feature(model, sae, index: int, mean: float = 0.0, **kw) -> list[Hook]:
    """Zero ablation, or mean ablation with `mean` (see `feature_means`)."""
    return feature_hooks(model, sae, {index: Edit("ablate", mean)}, **kw)


@torch.no_grad()
def feature_means(
    model: HookedTransformer,
    sae: SAE,
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"] | None = None,
    hook_name: str | None = None,
) -> Float[Tensor, " d_sae"]:
    """Mean activation of every feature over the given positions (default: all non-padding ones)."""
    acts = activations(model, tokens, sae_hook_name(sae, hook_name))
    mask = (tokens != 0) if mask is None else mask
    mask = mask[:, : acts.shape[1]]
    return sae.encode(acts[mask]).mean(0)


# --- neurons and directions -------------------------------------------------------------------------------------------
def neuron_hooks(
    model: HookedTransformer, hook_name: str, edits: Mapping[int, Edit], where: Where | None = None
) -> list[Hook]:
    """Edit units of any hook whose activation is [batch, pos, width] (an MLP's hook_post, a residual stream)."""
    shape = hook_shape(model, hook_name)
    if len(shape) != 1:
        raise VillesError(f"hook {hook_name!r} has activation shape {shape} per position: neurons need one axis")
    edits = _edits(edits)
    for i in edits:
        _check_index(i, shape[0], "neuron")
    ctx = _context(model, where, hook_name)
    items = sorted(edits.items())
    idx = torch.tensor([i for i, _ in items])

    def fn(x: Float[Tensor, "batch pos width"], hook) -> Float[Tensor, "batch pos width"]:
        m = ctx.mask(x) if ctx else None
        cols = torch.stack([e.apply(x[..., i]) for i, e in items], dim=-1).to(x.dtype)
        if m is not None:
            cols = torch.where(_expand(m, cols), cols, x[..., idx])
        x = x.clone()
        x[..., idx] = cols
        return x

    return [*(ctx.hooks() if ctx else []), (hook_name, fn)]


def clamp_neuron(model, hook_name: str, index: int, value: float, **kw) -> list[Hook]:
    return neuron_hooks(model, hook_name, {index: Edit("clamp", value)}, **kw)


def add_neuron(model, hook_name: str, index: int, alpha: float, **kw) -> list[Hook]:
    return neuron_hooks(model, hook_name, {index: Edit("add", alpha)}, **kw)


def scale_neuron(model, hook_name: str, index: int, factor: float, **kw) -> list[Hook]:
    return neuron_hooks(model, hook_name, {index: Edit("scale", factor)}, **kw)


def ablate_neuron(model, hook_name: str, index: int, mean: float = 0.0, **kw) -> list[Hook]:
    return neuron_hooks(model, hook_name, {index: Edit("ablate", mean)}, **kw)


def direction_hooks(
    model: HookedTransformer,
    hook_name: str,
    direction: Float[Tensor, " width"],
    edit: Edit,
    where: Where | None = None,
) -> list[Hook]:
    """Edit x's coordinate along `direction` (c = x·d / d·d): add a → x + a·d; clamp v → coordinate v."""
    shape = hook_shape(model, hook_name)
    d = torch.as_tensor(direction).detach().float().flatten()
    if tuple(d.shape) != shape[-1:] or len(shape) != 1:
        raise VillesError(f"direction of shape {tuple(d.shape)} does not fit hook {hook_name!r} (width {shape})")
    if not torch.isfinite(d).all() or float(d @ d) == 0:
        raise VillesError("a steering direction must be finite and non-zero")
    ctx = _context(model, where, hook_name)
    dd = float(d @ d)

    def fn(x: Float[Tensor, "batch pos width"], hook) -> Float[Tensor, "batch pos width"]:
        m = ctx.mask(x) if ctx else None
        dx = d.to(x.device, x.dtype)
        if edit.op == "add":  # no projection needed: exactly x + a·d
            delta = torch.full(x.shape[:-1], edit.value, dtype=x.dtype, device=x.device)
        else:
            c = (x @ dx) / dd
            delta = edit.apply(c) - c
        if m is not None:
            delta = delta * m.to(x.dtype)
        return x + delta[..., None] * dx

    return [*(ctx.hooks() if ctx else []), (hook_name, fn)]


def add_direction(model, hook_name: str, direction, alpha: float, **kw) -> list[Hook]:
    return direction_hooks(model, hook_name, direction, Edit("add", alpha), **kw)


def clamp_direction(model, hook_name: str, direction, value: float, **kw) -> list[Hook]:
    return direction_hooks(model, hook_name, direction, Edit("clamp", value), **kw)


def compose(*hook_lists: Sequence[Hook]) -> list[Hook]:
    """Several interventions at once; at a shared hook point they apply in the order given."""
    return [h for hooks in hook_lists for h in hooks]


# --- activations ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def activations(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], hook_name: str, batch_size: int = 2048
) -> Float[Tensor, "batch pos ..."]:
    """One hook's activations on a batch of token rows (later blocks are not run); rows longer than the context are
    cut to it."""
    hook_shape(model, hook_name)
    tokens = tokens[:, : model.cfg.n_ctx]
    layer = _layer_of(hook_name)
    got: list[Tensor] = []

    def grab(x, hook):
        got.append(x.detach())

    for b0 in range(0, len(tokens), batch_size):
        stop = None if layer is None or layer + 1 >= model.cfg.n_layers else layer + 1
        model.run_with_hooks(tokens[b0 : b0 + batch_size], fwd_hooks=[(hook_name, grab)], stop_at_layer=stop)
    return torch.cat(got)


def _layer_of(hook_name: str) -> int | None:
    parts = hook_name.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    return -1 if hook_name in ("hook_embed", "hook_pos_embed") else None


# --- effect report ----------------------------------------------------------------------------------------------------
def _ends(*endings: str) -> Callable[[str], bool]:
    return lambda s: s.endswith(endings)


# Name-level properties whose rates a steering changes (the whole name's spelling; endings are the name's last letters)
PROPERTIES: dict[str, Callable[[str], bool]] = {
    "hyphen": lambda s: "-" in s,
    "space": lambda s: " " in s,
    "apostrophe": lambda s: "'" in s,
    "saint": lambda s: s.startswith(("saint-", "sainte-", "saint ", "sainte ", "st-")),
    "article": lambda s: s.startswith(("le ", "la ", "les ", "l'")),
    "-y": _ends("y"),
    "-ac": _ends("ac"),
    "-heim": _ends("heim"),
    "-ville": _ends("ville"),
    "-court": _ends("court"),
    "-viller(s)": _ends("viller", "villers", "willer"),
    "-bach": _ends("bach"),
    "-ec": _ends("ec"),
    "-ières": _ends("ière", "ières"),
    "-sur-": lambda s: "-sur-" in s,
}


def property_rates(
    names: Sequence[str], extra: Mapping[str, Callable[[Sequence[str]], Sequence[bool]]] | None = None
) -> dict[str, float]:
    n = max(len(names), 1)
    rates = {k: sum(map(p, names)) / n for k, p in PROPERTIES.items()}
    for k, f in (extra or {}).items():
        rates[k] = sum(map(bool, f(names))) / n
    return rates


def _padded(token_lists: Sequence[Sequence[int]]) -> Int[Tensor, "batch pos"]:
    out = torch.zeros(len(token_lists), max(map(len, token_lists)), dtype=torch.long)
    for i, t in enumerate(token_lists):
        out[i, : len(t)] = torch.tensor(t)
    return out


@torch.no_grad()
def tokens_nll(
    model: HookedTransformer, token_lists: Sequence[Sequence[int]], batch_size: int = 1024
) -> tuple[float, int]:
    """(summed NLL, predictions) of sampled token rows (<bos> … [<eos>]) under the model, padding excluded. Works on
    names cut at the context length, which `evaluate_nll` (which appends <eos>) cannot encode."""
    from training.lm import token_nll

    total, count = 0.0, 0
    for b0 in range(0, len(token_lists), batch_size):
        t = _padded(token_lists[b0 : b0 + batch_size])
        total += token_nll(model(t), t).sum().item()
        count += int((t[:, 1:] != 0).sum())
    return total, count


@torch.no_grad()
def steering_kl(
    model: HookedTransformer, hooks: Sequence[Hook], token_lists: Sequence[Sequence[int]], batch_size: int = 1024
) -> float:
    """Mean KL(steered ‖ unsteered) of the next-letter distributions along the given (steered) samples, in nats."""
    from training.lm import log_probs

    total, count = 0.0, 0
    for b0 in range(0, len(token_lists), batch_size):
        t = _padded(token_lists[b0 : b0 + batch_size])
        clean = log_probs(model(t))[:, :-1]
        steered = log_probs(model.run_with_hooks(t, fwd_hooks=list(hooks)))[:, :-1]
        # <pad>/<bos> are -inf in both: leave them out rather than meet inf - inf
        kl = torch.where(steered > float("-inf"), steered.exp() * (steered - clean), 0.0).sum(-1)
        live = t[:, 1:] != 0
        total += kl[live].sum().item()
        count += int(live.sum())
    return total / max(count, 1)


def _noop(x, hook):
    return None


# a hook that changes nothing: unsteered samples then take the same sampling path (TransformerLens's cache) as steered
# ones, so with the same seed the two lists differ only where the steering changed a choice
NOOP_HOOKS: list[Hook] = [("hook_embed", _noop)]


@dataclass
class EffectReport:
    n: int
    seed: int
    rates_base: dict[str, float]
    rates_steered: dict[str, float]
    length_base: float
    length_steered: float
    kl: float  # mean KL(steered ‖ unsteered) per generated position, nats
    nll_base: float  # nats/char of the unsteered samples under the unsteered model
    nll_steered: float  # nats/char of the steered samples under the unsteered model (plausibility)
    novelty_base: float
    novelty_steered: float
    names_base: list[str] = field(default_factory=list)
    names_steered: list[str] = field(default_factory=list)

    @property
    def cost(self) -> float:
        """Plausibility cost: how much less likely the steered names are to the unsteered model, nats/char."""
        return self.nll_steered - self.nll_base

    def to_dict(self) -> dict:
        return {**asdict(self), "cost": self.cost}

    def table(self) -> list[dict]:
        rows = [
            {
                "measure": k,
                "unsteered": f"{self.rates_base[k]:.1%}",
                "steered": f"{self.rates_steered[k]:.1%}",
                "change": f"{self.rates_steered[k] - self.rates_base[k]:+.1%}",
            }
            for k in self.rates_base
        ]
        num = [
            ("length (chars)", self.length_base, self.length_steered, "{:.2f}"),
            ("NLL under unsteered (nats/char)", self.nll_base, self.nll_steered, "{:.3f}"),
            ("novelty", self.novelty_base, self.novelty_steered, "{:.1%}"),
        ]
        for label, a, b, fmt in num:
            rows.append({"measure": label, "unsteered": fmt.format(a), "steered": fmt.format(b), "change": ""})
            rows[-1]["change"] = ("{:+.3f}" if "%" not in fmt else "{:+.1%}").format(b - a)
        rows.append({"measure": "KL from unsteered (nats/step)", "unsteered": "0", "steered": f"{self.kl:.3f}"})
        rows[-1]["change"] = ""
        return rows


@torch.no_grad()
def effect_report(
    model: HookedTransformer,
    tokenizer: CharTokenizer,
    corpus: Corpus,
    hooks: Sequence[Hook],
    n: int = 200,
    seed: int = 0,
    temperature: float = 1.0,
    extra: Mapping[str, Callable[[Sequence[str]], Sequence[bool]]] | None = None,
    base: tuple | None = None,
) -> EffectReport:
    """Steered names beside unsteered ones from the same seed, with the change in property rates, KL, plausibility
    and novelty. `base` reuses an unsteered (samples, nll) pair across many reports with the same n and seed."""
    from training.ladder import novelty
    from training.sampling import SampleSettings, sample_names

    settings = SampleSettings(n=n, seed=seed, temperature=temperature)
    if base is None:
        base = unsteered_baseline(model, tokenizer, settings)
    clean, nll_base = base
    steered = sample_names(model, tokenizer, settings, fwd_hooks=list(hooks))
    s_total, s_count = tokens_nll(model, steered.tokens)

    def mean_len(names):
        return sum(map(len, names)) / max(len(names), 1)

    return EffectReport(
        n=n,
        seed=seed,
        rates_base=property_rates(clean.names, extra),
        rates_steered=property_rates(steered.names, extra),
        length_base=mean_len(clean.names),
        length_steered=mean_len(steered.names),
        kl=steering_kl(model, hooks, steered.tokens),
        nll_base=nll_base,
        nll_steered=s_total / max(s_count, 1),
        novelty_base=novelty(clean.names, corpus),
        novelty_steered=novelty(steered.names, corpus),
        names_base=clean.names,
        names_steered=steered.names,
    )


def strength_sweep(
    model: HookedTransformer,
    tokenizer: CharTokenizer,
    corpus: Corpus,
    make_hooks: Callable[[float], Sequence[Hook]],
    strengths: Sequence[float],
    n: int = 200,
    seed: int = 0,
) -> list[EffectReport]:
    """One effect report per strength (`make_hooks(strength)`, e.g. `lambda a: add_feature(model, sae, i, a)`),
    all against the same unsteered samples."""
    from training.sampling import SampleSettings

    base = unsteered_baseline(model, tokenizer, SampleSettings(n=n, seed=seed))
    return [effect_report(model, tokenizer, corpus, make_hooks(a), n=n, seed=seed, base=base) for a in strengths]


@torch.no_grad()
def unsteered_baseline(model, tokenizer, settings) -> tuple:
    from training.sampling import sample_names

    clean = sample_names(model, tokenizer, settings, fwd_hooks=NOOP_HOOKS)
    total, count = tokens_nll(model, clean.tokens)
    return clean, total / max(count, 1)


# --- the catalogue ----------------------------------------------------------------------------------------------------
# property (a measure of `interp.steering.PROPERTIES`, or length) -> the concept-bank concepts (`interp.concepts`) that
# spell it; a concept id that the bank does not have simply finds no feature. The features are whatever the
# monosemanticity scores label with these concepts: no index is chosen by hand.
PROPERTY_CONCEPTS: dict[str, tuple[str, ...]] = {
    "hyphen": ("char=-", "prev=-", "boundary=after_separator"),
    "space": ("char=␣", "prev=␣", "last2=a␣", "last2=e␣"),
    "apostrophe": ("char='", "prev='", "word=l", "word=d"),
    "saint": ("word=saint", "word=sainte", "last3=^sa", "last3=sai", "last3=ain", "last3=int", "last2=^s"),
    "article": ("word=le", "word=la", "word=les", "last2=^l", "last3=^le", "last3=^la"),
    "-sur-": ("word=sur", "last3=-su", "last3=sur", "last3=ur-"),
    "-y": ("char=y", "suffix=-ay", "suffix=-ey", "suffix=-gny", "suffix=-igny", "suffix=-illy", "suffix=-ry"),
    "-ac": ("suffix=-ac", "suffix=-ignac", "suffix=-nac", "suffix=-sac", "last2=ac"),
    "-heim": ("suffix=-heim", "last3=eim", "last3=hei"),
    "-ville": ("suffix=-ville", "suffix=-eville", "suffix=-nville", "suffix=-rville", "word=ville", "last3=vil"),
    "-court": ("suffix=-court", "suffix=-ncourt", "last3=cou", "last3=our", "last3=urt"),
    "-viller(s)": ("suffix=-willer", "suffix=-iller", "last3=wil", "last3=ler"),
    "-bach": ("suffix=-bach", "suffix=-ach", "last3=bac", "last3=ach"),
    "-ec": ("suffix=-ec", "last2=ec"),
    "length": ("position=12-17", "position=18+"),
}


def property_value(names: Sequence[str], prop: str) -> float:
    """A property's rate among names (length: the mean length in characters)."""
    if prop == "length":
        return sum(map(len, names)) / max(len(names), 1)
    return sum(map(PROPERTIES[prop], names)) / max(len(names), 1)


def property_effect(before: float, after: float, prop: str) -> float:
    """Cohen's h between two rates (|h| 0.2 small, 0.5 medium, 0.8 large); length: the change in characters."""
    if prop == "length":
        return after - before
    return 2 * math.asin(math.sqrt(after)) - 2 * math.asin(math.sqrt(before))


def _has(name: str, prop: str) -> bool:
    return True if prop == "length" else PROPERTIES[prop](name)


@torch.no_grad()
def feature_mean_when_active(model: HookedTransformer, sae: SAE, names: Sequence[str]) -> Float[Tensor, " d_sae"]:
    """Each SAE feature's mean activation where it fires on names (0 where it never does): its typical size."""
    from interp.monosemanticity import collect

    hook = sae.cfg.metadata.hook_name
    total, count = torch.zeros(sae.cfg.d_sae), torch.zeros(sae.cfg.d_sae)
    for x in collect(model, names, [hook])[hook].split(8192):
        f = sae.encode(x).float()
        total += f.sum(0)
        count += (f > 0).sum(0)
    return total / count.clamp(min=1)


def steering_catalogue(
    model: HookedTransformer,
    tokenizer: CharTokenizer,
    corpus: Corpus,
    sae: SAE,
    rows: Sequence[dict],
    mean_on: Float[Tensor, " d_sae"],
    n: int = 200,
    seed: int = 0,
    per_property: int = 1,
    budget: float = 0.5,
    min_novelty: float = 0.9,
    log: Callable[[str], None] | None = None,
    base: tuple | None = None,
) -> list[dict]:
    """Features whose steering changes a named property, chosen from the concept labels (`rows`: monosemanticity
    rows of the SAE's features; `mean_on`: `feature_mean_when_active`).

    Candidates: the best-scored features labelled with each property's concepts (PROPERTY_CONCEPTS, `per_property`
    each). Each is steered (added at 1.5 and 3 times its typical activation, or amplified ×4 where it fires) and every
    property is measured, since a feature that reads a concept need not write it (the "just read a hyphen" feature
    changes what follows the hyphen, not how many there are). Per property, the steering that changes it most within
    the cost budget (nats/char) and with novelty ≥ min_novelty is kept, each feature at most once. `base` reuses an
    unsteered (samples, nll) pair of the same n and seed (`unsteered_baseline`)."""
    from interp.monosemanticity import units_for
    from training.sampling import SampleSettings

    log = log or (lambda _msg: None)
    if base is None:
        base = unsteered_baseline(model, tokenizer, SampleSettings(n=n, seed=seed))
    candidates: dict[int, str] = {}
    for concepts in PROPERTY_CONCEPTS.values():
        labelled = sorted(((r["mono1"], r["index"], c) for c in concepts for r in units_for(rows, c)[:1]), reverse=True)
        for _, i, c in labelled[:per_property]:
            candidates.setdefault(i, c)

    def report(i: int, edit: Edit) -> EffectReport:
        return effect_report(model, tokenizer, corpus, feature_hooks(model, sae, {i: edit}), n=n, seed=seed, base=base)

    trials = []  # (feature, concept, edit, report)
    for i, concept in candidates.items():
        typical = float(mean_on[i])
        for edit in (Edit("add", 1.5 * typical), Edit("add", 3 * typical), Edit("scale", 4.0)):
            trials.append((i, concept, edit, report(i, edit)))
            log(f"catalogue: feature {i} ({concept}) {edit.op} {edit.value:.2f}: cost {trials[-1][3].cost:+.3f}")

    # largest effects first, each property and each feature at most once (so that the catalogue shows many features)
    def size(rep: EffectReport, prop: str) -> float:
        return abs(property_effect(property_value(rep.names_base, prop), property_value(rep.names_steered, prop), prop))

    scored = sorted(
        (
            (size(r, p), p, i, c, e, r)
            for p in PROPERTY_CONCEPTS
            for i, c, e, r in trials
            if r.cost <= budget and r.novelty_steered >= min_novelty
        ),
        key=lambda t: -t[0],
    )
    out, done, used = [], set(), set()
    for _, prop, i, concept, edit, rep in scored:
        if prop in done or i in used:
            continue
        done.add(prop)
        used.add(i)
        before, after = property_value(rep.names_base, prop), property_value(rep.names_steered, prop)
        ablated = report(i, Edit("ablate", 0.0))
        fmt = (lambda v: f"{v:.2f}") if prop == "length" else (lambda v: f"{v:.1%}")
        label = next(r for r in rows if r["kind"] == "feature" and r["index"] == i)
        out.append(
            {
                "property": prop,
                "feature": i,
                "label (Mono1)": f"{concept} ({label['mono1']:.2f})",
                "steering": f"{edit.op} {edit.value:.2f}",
                "unsteered": fmt(before),
                "steered": fmt(after),
                "effect": f"{property_effect(before, after, prop):+.2f}" + (" chars" if prop == "length" else " h"),
                "ablated": fmt(property_value(ablated.names_steered, prop)),
                "cost": f"{rep.cost:+.3f}",
                "KL": f"{rep.kl:.3f}",
                "novelty": f"{rep.novelty_steered:.0%}",
                "example": next((s for s in rep.names_steered if s not in rep.names_base and _has(s, prop)), ""),
            }
        )
        log(f"catalogue {prop}: feature {i} ({concept}) {fmt(before)} -> {fmt(after)} (cost {rep.cost:+.3f})")
    return sorted(out, key=lambda r: -abs(float(r["effect"].split()[0])))


# --- command line -----------------------------------------------------------------------------------------------------
def _pair(text: str, flag: str, default: str | None = None) -> tuple[int, str]:
    key, sep, value = text.partition("=")
    if not sep:
        if default is None:
            raise VillesError(f"{flag} takes FEATURE=VALUE, got {text!r}")
        value = default
    try:
        index = int(key)
    except ValueError:
        raise VillesError(f"{flag}: feature index must be an integer, got {key!r}") from None
    return index, value


def parse_edits(clamp=(), add=(), scale=(), ablate=()) -> dict[int, Edit | str]:
    """CLI edits: {feature: Edit} ("mean" ablations are resolved once the model and SAE are loaded)."""
    edits: dict[int, Edit | str] = {}
    for flag, op, items in (("--clamp", "clamp", clamp), ("--add", "add", add), ("--scale", "scale", scale)):
        for text in items or ():
            i, v = _pair(text, flag)
            if i in edits:
                raise VillesError(f"feature {i} is edited twice")
            edits[i] = Edit(op, check_finite(v, f"{flag} {i}"))
    for text in ablate or ():
        i, v = _pair(text, "--ablate", default="zero")
        if i in edits:
            raise VillesError(f"feature {i} is edited twice")
        if v not in ("zero", "mean"):
            raise VillesError(f"--ablate {i}= takes zero or mean, got {v!r}")
        edits[i] = Edit("ablate", 0.0) if v == "zero" else "mean"
    return edits


def add_steer_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "steer", help="generate with SAE features (or a region direction) clamped/added/ablated; report the effect"
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="model folder (default checkpoints/transformer)")
    p.add_argument("--sae", type=Path, default=None, help="SAELens SAE folder (default checkpoints/sae)")
    p.add_argument("--clamp", action="append", default=[], metavar="F=V", help="clamp feature F to V")
    p.add_argument("--add", action="append", default=[], metavar="F=A", help="add A x feature F's decoder direction")
    p.add_argument("--scale", action="append", default=[], metavar="F=S", help="multiply feature F by S")
    p.add_argument("--ablate", action="append", default=[], metavar="F[=mean]", help="zero (or mean) ablate F")
    p.add_argument("--region", default=None, help="steer toward a region, e.g. Bretagne (see --method, --alpha)")
    p.add_argument(
        "--method",
        default="fitted",
        choices=["fitted", "diff-of-means", "probe", "sae-add", "sae-clamp"],
        help="region steering: fitted vectors (the best measured), a direction at each --hook, or the SAE's region "
        "features added/clamped",
    )
    p.add_argument("--alpha", type=float, default=None, help="region steering strength (default: the method's)")
    p.add_argument(
        "--hook", default=None, help="region direction hook(s), comma-separated, or all (default: the embedding)"
    )
    p.add_argument(
        "--labels", type=Path, default=None, help="monosemanticity folder: region features from its concept labels"
    )
    p.add_argument("--first", type=int, default=None, help="steer only positions < FIRST (0 is <bos>)")
    p.add_argument("--positions", default=None, help="steer only these positions, e.g. 0,1,2")
    p.add_argument("--after", default=None, help="steer only the letter right after one of these characters")
    p.add_argument("--no-error-term", action="store_true", help="splice the SAE reconstruction (drop its error)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--show", type=int, default=15, help="name pairs to print")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_steer)


def _where_from_args(args) -> Where | None:
    positions = None
    if args.positions is not None:
        try:
            positions = tuple(int(x) for x in args.positions.split(",") if x.strip())
        except ValueError:
            raise VillesError(f"--positions takes integers separated by commas, got {args.positions!r}") from None
    where = Where(positions=positions, first=args.first, after=args.after)
    return None if where.everywhere else where


def cmd_steer(args) -> int:
    from training.cli import format_table
    from training.ladder import DEFAULT_CHECKPOINTS

    if args.n <= 0:
        raise VillesError(f"--n must be positive, got {args.n}")
    check_finite(args.temperature, "--temperature")
    edits = parse_edits(args.clamp, args.add, args.scale, args.ablate)
    if args.alpha is not None:
        check_finite(args.alpha, "--alpha")
    if not edits and args.region is None:
        raise VillesError("nothing to steer: give --clamp/--add/--scale/--ablate, or --region")
    where = _where_from_args(args)
    from training.data import load_communes

    corpus = load_communes()
    if args.region is not None:
        from interp.regions import check_region

        check_region(corpus, args.region)
    from training.neural import load_checkpoint

    checkpoint = args.checkpoint or DEFAULT_CHECKPOINTS["transformer"]
    model, tokenizer, config = load_checkpoint(checkpoint)
    if config["kind"] != "transformer":
        raise VillesError(f"{checkpoint} holds a {config['kind']} model: steering needs the transformer")
    hooks: list[Hook] = []
    sae = None
    if edits or (args.region is not None and args.method.startswith("sae-")):
        from training.sae import load_sae

        sae = load_sae(args.sae or DEFAULT_CHECKPOINTS["transformer"].parent / "sae")
    labels = None
    if args.labels is not None:
        from interp.monosemanticity import read_rows

        labels = read_rows(args.labels)
    if edits:
        if any(e == "mean" for e in edits.values()):
            tokens = tokenizer.batch(corpus.split_names("val"), drop_unknown=True)
            means = feature_means(model, sae, tokens)
            edits = {i: Edit("ablate", float(means[i])) if e == "mean" else e for i, e in edits.items()}
        hooks += feature_hooks(model, sae, edits, where=where, keep_error=not args.no_error_term)
    extra = None
    if args.region is not None:
        from interp.regions import cached_classifier, region_steering_hooks

        hooks += region_steering_hooks(
            model, tokenizer, corpus, args.region, args.method, args.hook, args.alpha, where, sae, labels,
            progress=not args.json,
        )  # fmt: skip
        clf = cached_classifier(corpus)
        extra = {f"region: {args.region}": lambda names: clf.is_region(names, args.region)}
    report = effect_report(
        model, tokenizer, corpus, hooks, n=args.n, seed=args.seed, temperature=args.temperature, extra=extra
    )
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return 0
    k = min(args.show, args.n)
    shown = zip(report.names_base[:k], report.names_steered[:k], strict=True)
    pairs = [{"unsteered": a, "steered": b} for a, b in shown]
    print(format_table(pairs, ["unsteered", "steered"]))
    print()
    print(format_table(report.table(), ["measure", "unsteered", "steered", "change"]))
    print(f"plausibility cost {report.cost:+.3f} nats/char, n={args.n}, seed={args.seed}", file=sys.stderr)
    return 0


__all__ = [
    "Edit",
    "Where",
    "feature_hooks",
    "clamp_feature",
    "add_feature",
    "scale_feature",
    "ablate_feature",
    "feature_means",
    "neuron_hooks",
    "clamp_neuron",
    "add_neuron",
    "scale_neuron",
    "ablate_neuron",
    "direction_hooks",
    "add_direction",
    "clamp_direction",
    "compose",
    "effect_report",
    "strength_sweep",
    "EffectReport",
    "PROPERTIES",
    "property_rates",
    "PROPERTY_CONCEPTS",
    "steering_catalogue",
    "feature_mean_when_active",
    "activations",
    "hook_shape",
]
