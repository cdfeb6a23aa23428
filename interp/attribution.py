"""Attribution of concepts (SAE features) to one predicted character, with the evidence of how far to trust it.

    from interp.attribution import attribute
    result = attribute(model, sae, "saint-malo", position=6)          # any HookedTransformer, any SAELens SAE(s)
    print(format_attribution(result))

Positions. `position` p is the index, in the name, of the character being predicted: the prediction made after
the prefix name[:p] (token position p of `<bos> c1 … cn`); p = len(name) predicts `<eos>`. None: every position.

Targets (`Target`): the logit or the log-probability of a character (default: the actual next character, `<eos>`
at the end), or the logit difference between two characters.

Nodes. An SAE on hook h splits the activation at each position q into its active features, its error
(activation − reconstruction) and its bias (the reconstruction of zero features, `decode(0)`):
    x_q = decode(0) + Σ_i f_i d_i + err_q,   d_i = decode(e_i) − decode(0).
A feature node is (SAE, q, i). An SAE on the last residual stream only reaches the target at its own position
(q = p); an SAE earlier in the network reaches it from every q ≤ p.

Methods (a registry: `METHODS`, `register_method`), each a number per node, in units of the target:
- direct   SAE on the last residual stream only. With the final norm's scale frozen at its clean value the readout
           is affine in the residual, so every node's term is exact: f_i (d_i · u) with u the readout direction
           through the norm and unembedding. Closure: features + error + bias + rest (norm and unembedding biases)
           sum to the target; with a mean baseline features read (f_i − b_i) and a `baseline` term holds Σ b_i d_i.
           Log-probability: log p_t = (logit_t − Σ_k p_k logit_k) − H(p) exactly, so nodes are read along e_t − p
           (the clean distribution p frozen) and a `softmax` node holds −H(p); the terms still close.
- gxa      gradient × (activation − baseline) with the SAEs spliced in with their error terms. Gradients pass straight
           through every SAE (the spliced value is exactly the clean activation; Marks et al.), the final norm's
           scale is frozen (otherwise the terms at the last residual sum to zero), other norms are live. The error
           node is error · gradient at the splice output (SAELens computes its error under no_grad, so a gradient
           never reaches `hook_sae_error`).
- ig       integrated gradients: an SAE's active features move together from the baseline to their values (error
           kept), midpoint rule with `ig_steps` steps; its completeness gap (Σ IG − the true change) is reported.
- ablation the true change of the target when one node alone is set to its baseline (features), or removed (error,
           bias), everything else clean: one batched forward. The ground truth the others are compared to.

Baselines: "zero" (ablate = set to 0) or "mean" (the feature's mean activation over reference names, e.g. from
`feature_means`). Only active features are nodes; inactive ones stay at 0.

Faithfulness, per prediction: Spearman of each method against ablation over the active features, the share of the
attribution carried by error nodes, and a keep-top-k curve (keep the k features a method ranks highest, set the other
active ones to the baseline, error kept; the fraction of the change recovered).

Graph (multi-layer): nodes are input positions (token + position embedding), features and error nodes of every SAE,
and the output; pruned by influence (|gxa|, the linearised total effect on the target). An edge u → v between
features carries u's effect on the target mediated by v (Δu · ∂a_v/∂u · ∂T/∂a_v, gradients passing straight through
the SAEs in between); an edge to the output carries the node's total effect (its gxa).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from training.errors import VillesError
from training.lm import log_probs
from training.sae import char_tokenizer
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIALS, CharTokenizer

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

TARGET_KINDS = ("logprob", "logit", "logit_diff")
BASELINES = ("zero", "mean")
FEATURE, ERROR, BIAS = 0, 1, 2
KIND_NAMES = {FEATURE: "feature", ERROR: "error", BIAS: "bias"}
KEEP_KS = (0, 1, 2, 3, 5, 10, 20)
FEATURE_LINK = "features/{index}.html"
# normalisations that keep state between SAELens's encode and decode: decode is then not a function of the features
STATEFUL_NORMS = ("constant_norm_rescale", "layer_norm")


# --- targets --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What is attributed at each position: `kind` of `char` (None: the actual next symbol), or for a logit
    difference, logit(char) − logit(versus)."""

    char: str | None = None
    kind: str = "logprob"
    versus: str | None = None

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise VillesError(f"unknown target kind {self.kind!r}: choose one of {', '.join(TARGET_KINDS)}")
        if (self.kind == "logit_diff") != (self.versus is not None):
            raise VillesError("a logit difference needs `versus` (the other character), and only it takes one")

    def describe(self, tok: CharTokenizer, t: int, v: int | None) -> str:
        c = _symbol(tok, t)
        if self.kind == "logit_diff":
            return f"logit({c}) - logit({_symbol(tok, v)})"
        return f"log p({c})" if self.kind == "logprob" else f"logit({c})"


def _as_target(target: Target | str | None) -> Target:
    if target is None:
        return Target()
    if isinstance(target, str):
        return Target(char=target)
    if isinstance(target, Target):
        return target
    raise VillesError(f"target must be a character, a Target or None, got {type(target).__name__}")


def _symbol(tok: CharTokenizer, i: int | None) -> str:
    return "<eos>" if i == EOS_ID else tok.itos[int(i)]


def _symbol_id(tok: CharTokenizer, ch: str, what: str) -> int:
    if ch in ("<eos>", EOS_ID):
        return EOS_ID
    i = tok.stoi.get(ch)
    if i is None or ch in SPECIALS:
        shown = "".join(tok.chars)
        raise VillesError(f"{what} {ch!r} is not a symbol the model predicts (characters: {shown!r}, or <eos>)")
    return i


def target_values(
    logits: Float[Tensor, "... vocab"], kind: str, t: Int[Tensor, "..."], v: Int[Tensor, "..."] | None = None
) -> Float[Tensor, "..."]:
    """The target at each prediction: log-probabilities use the project's masked softmax (never <pad>/<bos>)."""
    if kind == "logprob":
        return log_probs(logits).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    out = logits.float().gather(-1, t.unsqueeze(-1)).squeeze(-1)
    if kind == "logit_diff":
        out = out - logits.float().gather(-1, v.unsqueeze(-1)).squeeze(-1)
    return out


# --- the SAEs and the model ---------------------------------------------------------------------------------------
@dataclass
class SAESpec:
    """One SAE spliced at one hook. `id` is the hook name (one SAE per hook)."""

    id: str
    sae: Any  # sae_lens.SAE
    hook: str
    order: int  # place of the hook along the forward pass
    final: bool  # reads the last residual stream: its nodes reach the output at their own position only


def final_hook(model: HookedTransformer) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def _as_specs(model: HookedTransformer, saes) -> list[SAESpec]:
    from sae_lens import SAE

    if isinstance(saes, SAE):
        pairs = [(None, saes)]
    elif isinstance(saes, Mapping):
        pairs = list(saes.items())
    elif isinstance(saes, Sequence) and not isinstance(saes, str):
        pairs = [(None, s) for s in saes]
    else:
        raise VillesError(f"saes must be an SAE, a list of SAEs or a {{hook: SAE}} mapping, got {type(saes).__name__}")
    if not pairs:
        raise VillesError("attribution needs at least one SAE")
    hooks = list(model.hook_dict)
    specs = []
    for hook, sae in pairs:
        if not isinstance(sae, SAE):
            raise VillesError(f"not a SAELens SAE: {type(sae).__name__}")
        hook = hook or sae.cfg.metadata.hook_name
        if not hook:
            raise VillesError("the SAE does not name its hook (cfg.metadata.hook_name): pass {hook: sae}")
        if hook not in model.hook_dict:
            raise VillesError(f"SAE/model mismatch: the SAE reads hook {hook!r}, which this model does not have")
        if sae.cfg.reshape_activations != "none":
            raise VillesError(f"SAE on {hook}: reshaped (hook_z) SAEs are not supported by attribution")
        if sae.cfg.normalize_activations in STATEFUL_NORMS:
            raise VillesError(
                f"SAE on {hook}: normalize_activations={sae.cfg.normalize_activations!r} makes decode depend on the "
                "input, so features have no fixed direction; attribution needs an SAE whose decoder is affine"
            )
        specs.append(SAESpec(hook, sae, hook, hooks.index(hook), hook == final_hook(model)))
    if len({s.hook for s in specs}) != len(specs):
        raise VillesError("two SAEs on one hook: give one SAE per hook")
    _check_widths(model, specs)
    return sorted(specs, key=lambda s: s.order)


@torch.no_grad()
def _check_widths(model: HookedTransformer, specs: list[SAESpec]) -> None:
    """An SAE of another model shows as a width its hook does not have: caught on a one-token forward, before any
    SAE sees an activation."""
    shapes: dict[str, tuple] = {}

    def grab(x, hook):
        shapes[hook.name] = tuple(x.shape)

    with model.hooks(fwd_hooks=[(s.hook, grab) for s in specs]):
        model(torch.tensor([[BOS_ID]], device=model.cfg.device), return_type=None)
    for s in specs:
        shape = shapes.get(s.hook)
        if shape is None or len(shape) != 3 or shape[-1] != s.sae.cfg.d_in:
            got = "nothing" if shape is None else f"shape {list(shape)}"
            raise VillesError(
                f"SAE/model mismatch: the SAE on {s.hook} reads vectors of {s.sae.cfg.d_in}, this model gives {got}"
            )


def model_tokenizer(model: HookedTransformer) -> CharTokenizer:
    """The CharTokenizer behind a villes model's Hugging Face tokenizer (same ids, checked)."""
    try:
        return char_tokenizer(model)
    except VillesError as e:
        raise VillesError(f"{e} (or pass tokenizer=)") from None


@contextmanager
def _no_param_grads(*modules: torch.nn.Module):
    """Gradients are wanted w.r.t. activations only: parameters stop requiring grad meanwhile (no .grad is written,
    no graph is built through weights), then get their flags back."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def _scale_hooks(model: HookedTransformer, freeze: str) -> list[tuple[str, Callable]]:
    """Detach normalisation scales: 'final' (ln_final only), 'all' (every norm), 'none'."""
    if freeze not in ("final", "all", "none"):
        raise VillesError(f"freeze_norms must be final, all or none, got {freeze!r}")

    def detach(x, hook):
        return x.detach()

    if freeze == "none":
        return []
    names = [h for h in model.hook_dict if h.endswith("hook_scale")]
    if freeze == "final":
        names = [h for h in names if h.startswith("ln_final.")]
    return [(h, detach) for h in names]


class _Splice:
    """Forward hook splicing an SAE with its error term: the value is the clean activation exactly, the gradient
    w.r.t. the input is the identity (straight through), and leaves give gradients w.r.t. the features (`f_var`)
    and the splice output (`out`, for error nodes).

    alpha [rows 1 1]: integrated-gradients rows, active features at baseline + alpha (f − baseline).
    edge_rows/pos/feat: for graph edges, row r also records a = encode(input)[pos, feat] differentiably."""

    def __init__(self, sae, base: Tensor | None = None, alpha: Tensor | None = None, edges=None):
        self.sae, self.base, self.alpha, self.edges = sae, base, alpha, edges
        self.f_var = self.out = self.edge_act = None

    def __call__(self, x: Tensor, hook) -> Tensor:
        sae = self.sae
        f = sae.encode(x.detach()).detach()
        if self.edges is not None:
            rows, pos, feat = self.edges
            self.edge_act = sae.encode(x[rows])[torch.arange(len(rows)), pos, feat]
        if self.alpha is None:
            f_var = f.clone().requires_grad_(True)
            recon = sae.decode(f_var)
            out = x + (recon - recon.detach()).to(x.dtype)
        else:
            base = self.base.to(f.dtype)
            f_var = torch.where(f != 0, base + self.alpha * (f - base), f).requires_grad_(True)
            out = x + (sae.decode(f_var) - sae.decode(f)).to(x.dtype)
        self.f_var, self.out = f_var, out
        return out


def _delta_hook(delta: Tensor):
    def hook(x, hook):
        return x + delta.to(x.dtype)

    return hook


def _input_leaf(store: dict):
    def hook(x, hook):
        leaf = x.detach().requires_grad_(True)
        store["emb"] = leaf
        return leaf

    return hook


# --- the prepared name ----------------------------------------------------------------------------------------------
@dataclass
class _Ctx:
    """Everything the methods share for one name: clean run, SAE decompositions, nodes, targets."""

    model: Any
    tok: CharTokenizer
    name: str
    specs: list[SAESpec]
    tokens: Tensor  # [1, S] <bos> + characters
    logits: Tensor  # [S, vocab] clean
    scale: Tensor | None  # [S] final norm scale (None: no final norm)
    resid: Tensor  # [S, d_model] last residual stream
    x: list[Tensor]  # per SAE [S, d]
    f: list[Tensor]  # per SAE [S, d_sae]
    err: list[Tensor]
    bias: list[Tensor]  # per SAE [d]
    base: list[Tensor]  # per SAE [d_sae] baseline activations
    positions: list[int]
    t: Tensor  # [P] target token per position
    v: Tensor | None
    target: Target
    values: Tensor  # [P] clean target
    # nodes (flat over SAEs): kind, sae, pos, feature (-1 for error/bias), activation, ablation delta
    kind: Tensor = None
    sae_of: Tensor = None
    pos: Tensor = None
    feat: Tensor = None
    act: Tensor = None
    deltas: list[Tensor] = field(default_factory=list)  # per SAE [n_k, d]
    dirs: list[Tensor] = field(default_factory=list)  # per SAE [n_features_k, d]: d_i of each feature node
    baseline_kind: str = "zero"
    ranges: list[tuple[int, int]] = field(default_factory=list)
    relevant: Tensor = None  # [P, N] bool
    extras: dict = field(default_factory=dict)
    freeze: str = "final"
    ig_steps: int = 16
    graph_rows: bool = False  # gxa keeps one row per target (needed for input nodes and graphs)

    @property
    def P(self) -> int:
        return len(self.positions)

    @property
    def N(self) -> int:
        return len(self.kind)

    def row_tokens(self, rows: int) -> Tensor:
        return self.tokens.expand(rows, -1)


@torch.no_grad()
def _prepare(model, tok, specs, name, positions, target: Target, baseline, means, freeze, ig_steps) -> _Ctx:
    if not isinstance(name, str) or not name:
        raise VillesError("empty name: give the name whose predictions to attribute")
    ids = tok.encode(name)[:-1]  # <bos> c1 … cn: the predictions of c1 … cn and <eos>
    if len(ids) > model.cfg.n_ctx:
        raise VillesError(f"name of {len(name)} characters is longer than the model's context ({model.cfg.n_ctx - 1})")
    n = len(name)
    if positions is None:
        positions = list(range(n + 1))
    else:
        positions = [positions] if isinstance(positions, int) else list(positions)
        for p in positions:
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= n:
                raise VillesError(f"position {p!r} is outside {name!r}: choose 0..{n} ({n} predicts the end)")
        if not positions:
            raise VillesError("no position to attribute")
    actual = [*ids[1:], EOS_ID]
    t = torch.tensor([actual[p] if target.char is None else _symbol_id(tok, target.char, "target") for p in positions])
    v = None
    if target.kind == "logit_diff":
        v = torch.full_like(t, _symbol_id(tok, target.versus, "versus"))
    device = model.cfg.device
    tokens = torch.tensor([ids], device=device)
    t, v = t.to(device), (v.to(device) if v is not None else None)

    store: dict[str, Tensor] = {}

    def keep(key):
        def hook(x, hook):
            store[key] = x[0]

        return hook

    hooks = [(s.hook, keep(s.hook)) for s in specs] + [(final_hook(model), keep("resid"))]
    if hasattr(model, "ln_final"):
        hooks.append(("ln_final.hook_scale", keep("scale")))
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens, return_type="logits")[0]
    xs, fs, errs, biases, bases = [], [], [], [], []
    for s in specs:
        x = store[s.hook]
        if x.ndim != 2 or x.shape[-1] != s.sae.cfg.d_in:
            raise VillesError(
                f"SAE/model mismatch: the SAE on {s.hook} reads d_in={s.sae.cfg.d_in} but this model gives "
                f"{list(x.shape[1:]) if x.ndim != 2 else x.shape[-1]} there"
            )
        f = s.sae.encode(x)
        recon = s.sae.decode(f).to(x.dtype)
        bias = s.sae.decode(torch.zeros(1, s.sae.cfg.d_sae, dtype=f.dtype, device=f.device))[0].to(x.dtype)
        xs.append(x)
        fs.append(f)
        errs.append(x - recon)
        biases.append(bias)
        bases.append(_baseline(s, baseline, means, f))
    ctx = _Ctx(
        model=model,
        tok=tok,
        name=name,
        specs=specs,
        tokens=tokens,
        logits=logits,
        scale=store["scale"][:, 0] if "scale" in store else None,
        resid=store["resid"],
        x=xs,
        f=fs,
        err=errs,
        bias=biases,
        base=bases,
        positions=positions,
        t=t,
        v=v,
        target=target,
        values=target_values(logits[positions], target.kind, t, v),
        freeze=freeze,
        ig_steps=ig_steps,
        baseline_kind=baseline,
    )
    _build_nodes(ctx)
    return ctx


def _baseline(spec: SAESpec, baseline, means, f: Tensor) -> Tensor:
    if baseline == "zero":
        return torch.zeros(f.shape[-1], dtype=f.dtype, device=f.device)
    if baseline != "mean":
        raise VillesError(f"unknown baseline {baseline!r}: choose zero or mean")
    if means is None or spec.id not in means:
        raise VillesError(f"baseline 'mean' needs means for the SAE on {spec.hook}: pass means=feature_means(...)")
    m = means[spec.id].to(f.device, f.dtype)
    if m.shape != (f.shape[-1],):
        raise VillesError(f"means for {spec.hook} have shape {list(m.shape)}, the SAE has {f.shape[-1]} features")
    return m


def _build_nodes(ctx: _Ctx) -> None:
    """Flat node arrays; each node's ablation delta (what is added to the activation to set it to baseline)."""
    kinds, saes, poss, feats, acts = [], [], [], [], []
    S = ctx.tokens.shape[1]
    start = 0
    for k, s in enumerate(ctx.specs):
        f = ctx.f[k]
        q, i = torch.nonzero(f, as_tuple=True)
        unit = torch.zeros(len(i), f.shape[-1], dtype=f.dtype, device=f.device)
        unit[torch.arange(len(i)), i] = 1.0
        dirs = (s.sae.decode(unit) - ctx.bias[k].to(f.dtype)).to(ctx.x[k].dtype)  # d_i, one row per active node
        vals = f[q, i]
        recon = ctx.bias[k] + torch.zeros_like(ctx.x[k]).index_add_(0, q, vals[:, None].to(dirs.dtype) * dirs)
        gap = (recon - (ctx.x[k] - ctx.err[k])).abs().max().item()
        if gap > 1e-3 * (1 + ctx.x[k].abs().max().item()):
            raise VillesError(f"SAE on {s.hook}: its decoder is not affine in the features (gap {gap:.2g})")
        feat_delta = (ctx.base[k][i] - vals)[:, None].to(dirs.dtype) * dirs
        pos_all = torch.arange(S, device=f.device)
        deltas = torch.cat([feat_delta, -ctx.err[k], -ctx.bias[k].expand(S, -1)])
        n = len(i)
        kinds += [FEATURE] * n + [ERROR] * S + [BIAS] * S
        saes += [k] * (n + 2 * S)
        poss.append(torch.cat([q, pos_all, pos_all]))
        feats.append(torch.cat([i, torch.full((2 * S,), -1, device=f.device)]))
        acts.append(torch.cat([vals.float(), ctx.err[k].norm(dim=-1).float(), ctx.bias[k].norm().expand(S).float()]))
        ctx.deltas.append(deltas)
        ctx.dirs.append(dirs)
        ctx.ranges.append((start, start + len(deltas)))
        start += len(deltas)
    dev = ctx.tokens.device
    ctx.kind = torch.tensor(kinds, device=dev)
    ctx.sae_of = torch.tensor(saes, device=dev)
    ctx.pos = torch.cat(poss)
    ctx.feat = torch.cat(feats)
    ctx.act = torch.cat(acts)
    final = torch.tensor([ctx.specs[k].final for k in saes], dtype=torch.bool, device=dev)
    p = torch.tensor(ctx.positions, device=dev)[:, None]
    # an SAE on the last residual stream reaches the output at its own position only; earlier ones from q <= p
    ctx.relevant = torch.where(final[None], ctx.pos[None] == p, ctx.pos[None] <= p)


# --- the batched runs -------------------------------------------------------------------------------------------------
def _ablated_values(ctx: _Ctx, masks: Float[Tensor, "rows N"]) -> Float[Tensor, "rows P"]:
    """One no-grad forward: row r adds Σ_n masks[r, n] · delta_n at each node's SAE and position (sets those nodes to
    their baseline), everything else clean. Returns the target at every attributed position.

    When the first edited hook is a residual stream, the forward starts there from the clean activation (the blocks
    before it cannot change): for an SAE on the last residual stream only the final norm and unembedding run."""
    rows, S = masks.shape[0], ctx.tokens.shape[1]
    deltas = {}
    for k in range(len(ctx.specs)):
        a, b = ctx.ranges[k]
        m = masks[:, a:b].to(ctx.deltas[k].dtype)
        if bool(m.any()):
            onehot = torch.nn.functional.one_hot(ctx.pos[a:b], S).to(m.dtype)  # [n_k, S]
            placed = (onehot[:, :, None] * ctx.deltas[k][:, None, :]).reshape(b - a, -1)  # [n_k, S * d]
            deltas[k] = (m @ placed).reshape(rows, S, -1)
    start, first = _start_layer(ctx, min(deltas, default=None))
    hooks = [(ctx.specs[k].hook, _delta_hook(d)) for k, d in deltas.items() if k != first]
    with torch.no_grad(), ctx.model.hooks(fwd_hooks=hooks):
        if first is None:
            logits = ctx.model(ctx.row_tokens(rows), return_type="logits")
        else:
            resid = ctx.x[first].expand(rows, -1, -1) + deltas[first].to(ctx.x[first].dtype)
            logits = ctx.model(resid, start_at_layer=start, return_type="logits")
    return _targets_at(ctx, logits)


def _stop_layer(hook: str) -> int | None:
    """stop_at_layer that still runs the block holding `hook` (None: run everything)."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) + 1 if m else None


def _start_layer(ctx: _Ctx, k: int | None) -> tuple[int | None, int | None]:
    """(layer to start the forward at, SAE whose activation is its input) for a residual-stream hook, else Nones."""
    if k is None:
        return None, None
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", ctx.specs[k].hook)
    if m is None or ctx.model.cfg.positional_embedding_type == "shortformer":
        return None, None
    return int(m.group(1)) + (m.group(2) == "post"), k


def _spliced_grads(
    ctx: _Ctx,
    rows: int,
    splices: list[_Splice],
    loss_pos: Tensor | int,
    want_emb: bool = False,
    freeze: str | None = None,
):
    """Forward with SAEs spliced (straight-through) and norms frozen as asked; backward of a sum of targets.
    loss_pos: a tensor gives row r the target at position index loss_pos[r] (rows past its length carry none); an
    int n lets each of the first n rows carry every position (valid when a target only depends on nodes at its own
    position). Returns (targets [rows, P], grads w.r.t. f_var and w.r.t. the splice output per SAE, and
    (embedding, its grad) when want_emb)."""
    store: dict[str, Tensor] = {}
    hooks = [("blocks.0.hook_resid_pre", _input_leaf(store))] if want_emb else []
    hooks += [(s.hook, sp) for s, sp in zip(ctx.specs, splices, strict=True)]
    hooks += _scale_hooks(ctx.model, ctx.freeze if freeze is None else freeze)
    saes = [s.sae for s in ctx.specs]
    with torch.enable_grad(), _no_param_grads(ctx.model, *saes), ctx.model.hooks(fwd_hooks=hooks):
        logits = ctx.model(ctx.row_tokens(rows), return_type="logits")
        vals = _targets_at(ctx, logits)
        if isinstance(loss_pos, int):
            loss = vals[:loss_pos].sum()
        else:
            loss = vals[torch.arange(len(loss_pos), device=vals.device), loss_pos].sum()
        inputs = [sp.f_var for sp in splices] + [sp.out for sp in splices] + ([store["emb"]] if want_emb else [])
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    K = len(splices)
    fix = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, inputs, strict=True)]
    emb = (store["emb"].detach(), fix[2 * K]) if want_emb else None
    return vals.detach(), fix[:K], fix[K : 2 * K], emb


def _targets_at(ctx: _Ctx, logits: Float[Tensor, "rows S vocab"]) -> Float[Tensor, "rows P"]:
    rows = logits.shape[0]
    p = torch.tensor(ctx.positions, device=logits.device)
    v = None if ctx.v is None else ctx.v.expand(rows, -1)
    return target_values(logits[:, p], ctx.target.kind, ctx.t.expand(rows, -1), v)


# --- methods ----------------------------------------------------------------------------------------------------------
MethodFn = Callable[[_Ctx], Tensor]
METHODS: dict[str, MethodFn] = {}
METHOD_HELP: dict[str, str] = {}


def register_method(name: str, help: str = ""):
    """Add a method: fn(ctx) -> [P, N] attributions (NaN where it does not apply)."""

    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        METHOD_HELP[name] = help
        return fn

    return deco


def _readout(ctx: _Ctx) -> tuple[Tensor, Tensor, Tensor | None]:
    """Readout direction u [P, d] and constant [P] with the final norm's scale frozen: cvec · logits = u · resid + c
    exactly. cvec is e_t (logit), e_t − e_v (difference) or e_t − p (log-probability, p the clean distribution);
    the log-probability's softmax term −H(p) is returned apart."""
    model = ctx.model
    p_idx = torch.tensor(ctx.positions, device=ctx.logits.device)
    V = ctx.logits.shape[-1]
    cvec = torch.nn.functional.one_hot(ctx.t, V).to(ctx.resid.dtype)
    softmax = None
    if ctx.target.kind == "logit_diff":
        cvec = cvec - torch.nn.functional.one_hot(ctx.v, V).to(cvec.dtype)
    elif ctx.target.kind == "logprob":
        lp = log_probs(ctx.logits[p_idx])
        prob = lp.exp()
        cvec = cvec - prob.to(cvec.dtype)
        softmax = (prob * torch.where(prob > 0, lp, torch.zeros_like(lp))).sum(-1)  # −H(p)
    c = cvec @ model.W_U.T  # [P, d]
    const = cvec @ model.b_U
    norm = type(getattr(model, "ln_final", None)).__name__ if hasattr(model, "ln_final") else None
    s = ctx.scale[p_idx][:, None] if ctx.scale is not None else None
    if norm == "LayerNorm":
        wc = model.ln_final.w * c
        u = (wc - wc.mean(-1, keepdim=True)) / s
        const = const + c @ model.ln_final.b
    elif norm == "LayerNormPre":
        u = (c - c.mean(-1, keepdim=True)) / s
    elif norm == "RMSNorm":
        u = model.ln_final.w * c / s
    elif norm == "RMSNormPre":
        u = c / s
    elif norm is None:
        u = c
    else:
        raise VillesError(f"direct attribution does not know the final norm {norm}")
    return u, const, softmax


@register_method("direct", "exact terms through the frozen final norm (SAE on the last residual stream only)")
def _direct(ctx: _Ctx) -> Tensor:
    finals = [k for k, s in enumerate(ctx.specs) if s.final]
    if not finals:
        raise VillesError(
            f"direct attribution needs an SAE on the last residual stream ({final_hook(ctx.model)}); use gxa, ig or "
            "ablation for SAEs elsewhere"
        )
    from transformer_lens.utilities.activation_functions import softcap_enabled

    if softcap_enabled(ctx.model.cfg.output_logits_soft_cap):
        raise VillesError("direct attribution needs a linear unembedding: this model soft-caps its logits")
    k = finals[0]
    u, const, softmax = _readout(ctx)
    out = torch.full((ctx.P, ctx.N), float("nan"), device=u.device)
    a, b = ctx.ranges[k]
    rel = ctx.relevant[:, a:b]
    # what each node adds to the activation relative to its baseline is −delta: (f_i − b_i) d_i, error, bias
    terms = (-ctx.deltas[k].to(u.dtype) @ u.T).T  # [P, n_k]
    out[:, a:b] = torch.where(rel, terms.float(), torch.full_like(terms.float(), float("nan")))
    # with a mean baseline, the active features at their baseline values, Σ b_i d_i, are a term of their own
    fm = ctx.kind[a:b] == FEATURE
    base_vals = ctx.base[k][ctx.feat[a:b][fm]].to(u.dtype)
    base_terms = (base_vals[:, None] * ctx.dirs[k]) @ u.T  # [n_features, P]
    baseline = torch.where(rel[:, fm], base_terms.T, torch.zeros_like(base_terms.T)).sum(-1).float()
    rest = const.float()
    total = torch.nan_to_num(out[:, a:b]).sum(-1) + rest + baseline
    total = total + (softmax.float() if softmax is not None else 0.0)
    ctx.extras["direct"] = {
        "rest": rest,
        "baseline": baseline if ctx.baseline_kind != "zero" else None,
        "softmax": softmax.float() if softmax is not None else None,
        "closure": (total - ctx.values.float()).abs(),
    }
    return out


def _node_grads(ctx: _Ctx, gf: list[Tensor], gout: list[Tensor], row_of_p: Tensor) -> Tensor:
    """gradient × (activation − baseline) per node from per-row gradients; row_of_p[j] is the row of position j."""
    out = torch.full((ctx.P, ctx.N), float("nan"), device=ctx.tokens.device)
    for k in range(len(ctx.specs)):
        a, b = ctx.ranges[k]
        kind, pos, feat = ctx.kind[a:b], ctx.pos[a:b], ctx.feat[a:b]
        g_f = gf[k][row_of_p]  # [P, S, d_sae]
        g_o = gout[k][row_of_p]  # [P, S, d]
        vals = torch.zeros(ctx.P, b - a, device=out.device)
        fm = kind == FEATURE
        fi = feat[fm]
        diff = (ctx.f[k][pos[fm], fi] - ctx.base[k][fi]).float()
        vals[:, fm] = diff[None] * g_f[:, pos[fm], fi].float()
        em = kind == ERROR
        vals[:, em] = torch.einsum("sd,psd->ps", ctx.err[k][pos[em]].float(), g_o[:, pos[em]].float())
        bm = kind == BIAS
        vals[:, bm] = g_o[:, pos[bm]].float() @ ctx.bias[k].float()
        out[:, a:b] = torch.where(ctx.relevant[:, a:b], vals, torch.full_like(vals, float("nan")))
    return out


@register_method("gxa", "gradient × activation with the final norm frozen, straight-through SAEs, error × gradient")
def _gxa(ctx: _Ctx) -> Tensor:
    """Terms of the linearised readout: at the last residual stream they equal direct attribution exactly."""
    return _grad_times_act(ctx, ctx.freeze, keep=True)


@register_method("atp", "attribution patching: gradient × activation of the live model (no frozen norm)")
def _atp(ctx: _Ctx) -> Tensor:
    """The first-order estimate of each node's ablation: the norm's scale moves as it does when a node is removed.
    At a scale-invariant readout (LayerNorm then logits) the terms of all nodes at one residual sum to ~0 (Euler),
    so they are estimates of single ablations, never shares of the target."""
    return _grad_times_act(ctx, "none", keep=False)


def _grad_times_act(ctx: _Ctx, freeze: str, keep: bool) -> Tensor:
    # one row serves every position when each target only depends on its own position's nodes (SAEs on the last
    # residual stream); otherwise (and for graphs, whose input nodes span positions) one row per position
    per_row = (keep and ctx.graph_rows) or not all(s.final for s in ctx.specs)
    dev = ctx.tokens.device
    splices = [_Splice(s.sae) for s in ctx.specs]
    if per_row:
        arange = torch.arange(ctx.P, device=dev)
        _, gf, gout, emb = _spliced_grads(ctx, ctx.P, splices, arange, want_emb=True, freeze=freeze)
        row_of_p = arange
        if keep:
            e, g = emb  # input nodes: token + position embedding at q against a zero embedding
            ctx.extras["gxa_input"] = (e * g).sum(-1).float()  # [P, S]
    else:
        _, gf, gout, _ = _spliced_grads(ctx, 1, splices, 1, freeze=freeze)
        row_of_p = torch.zeros(ctx.P, dtype=torch.long, device=dev)
    if keep:
        ctx.extras["gxa_grads"] = (gf, row_of_p)
    return _node_grads(ctx, gf, gout, row_of_p)


@register_method("ig", "integrated gradients from the baseline (error kept), ig_steps steps denser near the baseline")
def _ig(ctx: _Ctx) -> Tensor:
    """IG along f(α) = base + α (f − base), α = u³ on the midpoint grid of u with weights ∝ 3u² (normalised): the
    same integral as the uniform rule, with the steps where the target moves fastest. Near the baseline the residual
    is small and the final norm's 1/scale makes the target swing: on saint-malo 16 uniform steps left a 20%
    completeness gap, 16 cubic steps 1e-5. Gradients are the target's own (no frozen norm): completeness holds."""
    n_steps = ctx.ig_steps
    dev = ctx.tokens.device
    out = torch.full((ctx.P, ctx.N), float("nan"), device=dev)
    completeness = []
    u = (torch.arange(n_steps, device=dev, dtype=torch.float32) + 0.5) / n_steps
    alphas, weights = u**3, 3 * u**2
    weights = weights / weights.sum()  # exact when the gradient is constant along the path (a linear target)
    P = ctx.P
    for k, s in enumerate(ctx.specs):
        if s.final:  # one path serves every position (each target reads its own position only); last row: alpha 0
            alpha = torch.cat([alphas, torch.zeros(1, device=dev)])
            loss_pos: Tensor | int = n_steps
        else:  # rows (step, position index j), then P rows at alpha = 0
            alpha = torch.cat([alphas.repeat_interleave(P), torch.zeros(P, device=dev)])
            loss_pos = torch.arange(P, device=dev).repeat(n_steps)
        splices = [
            _Splice(o.sae, base=ctx.base[k], alpha=alpha[:, None, None]) if j == k else _Splice(o.sae)
            for j, o in enumerate(ctx.specs)
        ]
        vals, gf, _, _ = _spliced_grads(ctx, len(alpha), splices, loss_pos, freeze="none")
        if s.final:
            g = torch.einsum("n,nsd->sd", weights, gf[k][:n_steps])[None].expand(P, -1, -1)
            at_base = vals[-1]
        else:
            g = torch.einsum("n,npsd->psd", weights, gf[k][: n_steps * P].reshape(n_steps, P, *gf[k].shape[1:]))
            at_base = vals[n_steps * P :][torch.arange(P), torch.arange(P)]
        a, b = ctx.ranges[k]
        fm = ctx.kind[a:b] == FEATURE
        pos, fi = ctx.pos[a:b][fm], ctx.feat[a:b][fm]
        diff = (ctx.f[k][pos, fi] - ctx.base[k][fi]).float()
        block = torch.full((P, b - a), float("nan"), device=dev)
        block[:, fm] = diff[None] * g[:, pos, fi].float()
        block = torch.where(ctx.relevant[:, a:b], block, torch.full_like(block, float("nan")))
        out[:, a:b] = block
        total = torch.nan_to_num(block).sum(-1)
        change = ctx.values.float() - at_base.float()
        completeness.append({"sae": s.id, "sum": total, "change": change, "gap": total - change})
    ctx.extras["ig"] = completeness
    return out


@register_method("ablation", "exact: the change of the target when the node alone is set to its baseline")
def _ablation(ctx: _Ctx) -> Tensor:
    dev = ctx.tokens.device
    K = len(ctx.specs)
    nodes = torch.nonzero(ctx.relevant.any(0), as_tuple=True)[0]
    # row 0 clean; one row per node; then one row per SAE with all its features at baseline (error kept)
    masks = torch.zeros(1 + len(nodes) + K, ctx.N, device=dev)
    masks[torch.arange(len(nodes), device=dev) + 1, nodes] = 1.0
    for k in range(K):
        masks[1 + len(nodes) + k] = ((ctx.kind == FEATURE) & (ctx.sae_of == k)).float()
    vals = _ablated_values(ctx, masks)  # [rows, P]
    out = torch.full((ctx.P, ctx.N), float("nan"), device=dev)
    out[:, nodes] = (vals[:1] - vals[1 : 1 + len(nodes)]).T.float()
    out = torch.where(ctx.relevant, out, torch.full_like(out, float("nan")))
    ctx.extras["ablation"] = {"clean": vals[0].float(), "all_features": vals[1 + len(nodes) :].float()}  # [K, P]
    return out


# --- faithfulness ----------------------------------------------------------------------------------------------------
def _ranks(x: Tensor) -> Tensor:
    """Ranks with ties averaged (as Spearman wants)."""
    vals, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    end = torch.cumsum(counts, 0).double()
    avg = end - (counts.double() + 1) / 2
    return avg[inv]


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman's rank correlation; NaN with fewer than 3 values or a constant side."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok].double(), b[ok].double()
    if len(a) < 3:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float("nan") if den == 0 else (ra @ rb).item() / den


def _keep_ks(n: int, ks: Sequence[int]) -> list[int]:
    return sorted({k for k in ks if k < n} | {n})


def _faithfulness(ctx: _Ctx, scores: dict[str, Tensor], ks: Sequence[int]) -> list[dict[str, dict]]:
    """Per prediction and per SAE (features of different layers carry the same information along the residual
    stream, so they are compared within one SAE): Spearman vs ablation over the active features, error share, and
    the keep-top-k curve (recovered fraction of T(clean) − T(all this SAE's features at baseline))."""
    abl = scores["ablation"]
    clean, floor = ctx.extras["ablation"]["clean"], ctx.extras["ablation"]["all_features"]
    methods = [m for m in scores if m != "ablation"] + ["ablation"]
    out: list[dict[str, dict]] = [{} for _ in ctx.positions]
    rows = []  # (position index j, sae k, method, k, mask)
    for j in range(ctx.P):
        for k, spec in enumerate(ctx.specs):
            mine = ctx.relevant[j] & (ctx.sae_of == k)
            F = torch.nonzero(mine & (ctx.kind == FEATURE), as_tuple=True)[0]
            E = mine & (ctx.kind == ERROR)
            change = (clean[j] - floor[k, j]).item()
            sign = 1.0 if change >= 0 else -1.0
            info = {"spearman": {}, "error_share": {}, "keep_top_k": {}, "change": change, "n_features": len(F)}
            for m in methods:
                sc = scores[m][j]
                if m != "ablation":
                    info["spearman"][m] = spearman(sc[F], abl[j, F])
                e_mass, f_mass = sc[E].abs().nansum().item(), sc[F].abs().nansum().item()
                has_err = bool(torch.isfinite(sc[E]).any())
                share = e_mass / (e_mass + f_mass) if has_err and e_mass + f_mass > 0 else float("nan")
                info["error_share"][m] = share
                if len(F) == 0 or not bool(torch.isfinite(sc[F]).all()):
                    continue
                order = F[torch.argsort(sign * sc[F], descending=True, stable=True)]
                for kk in _keep_ks(len(F), ks):
                    mask = torch.zeros(ctx.N, device=F.device)
                    mask[order[kk:]] = 1.0
                    rows.append((j, k, m, kk, mask))
            out[j][spec.id] = info
    if rows:
        vals = _ablated_values(ctx, torch.stack([r[4] for r in rows]))
        for r, (j, k, m, kk, _) in enumerate(rows):
            info = out[j][ctx.specs[k].id]
            change = info["change"]
            got = vals[r, j].item() - floor[k, j].item()
            info["keep_top_k"].setdefault(m, []).append([kk, got / change if abs(change) > 1e-6 else float("nan")])
    return out


# --- graph -----------------------------------------------------------------------------------------------------------
def _keep(values: Tensor, share: float, cap: int) -> list[int]:
    """Indices by decreasing |value| until `share` of the total |value| is covered, at most `cap`."""
    mag = values.abs()
    total = mag.sum().item()
    if total == 0 or len(values) == 0:
        return []
    order = torch.argsort(mag, descending=True).tolist()
    kept, acc = [], 0.0
    for i in order[:cap]:
        kept.append(i)
        acc += mag[i].item()
        if acc >= share * total:
            break
    return kept


def _graphs(ctx: _Ctx, gxa: Tensor, labels, link: str, node_share: float, max_features: int, edge_min: float):
    """One pruned attribution graph per attributed position (see the module docstring)."""
    dev = ctx.tokens.device
    inputs = ctx.extras["gxa_input"]  # [P, S]
    gf_all, row_of_p = ctx.extras["gxa_grads"]
    kept_nodes = []  # per j: list of node indices (flat) ; inputs separately
    kept_inputs = []
    downstream = []  # (j, node index)
    for j, p in enumerate(ctx.positions):
        nodes = []
        for k in range(len(ctx.specs)):
            a, b = ctx.ranges[k]
            for kind, share, cap in ((FEATURE, node_share, max_features), (ERROR, node_share, 3)):
                idx = torch.nonzero(ctx.relevant[j, a:b] & (ctx.kind[a:b] == kind), as_tuple=True)[0] + a
                nodes += [idx[i].item() for i in _keep(gxa[j, idx], share, cap)]
        kept_nodes.append(nodes)
        kept_inputs.append(_keep(inputs[j, : p + 1], node_share, 6))
        downstream += [(j, n) for n in nodes if ctx.kind[n] == FEATURE]
    edges: list[list[dict]] = [[] for _ in ctx.positions]
    if downstream:
        rows = len(downstream)
        splices = []
        for k, s in enumerate(ctx.specs):
            mine = [(r, n) for r, (_, n) in enumerate(downstream) if ctx.sae_of[n] == k]
            sel = None
            if mine:
                r_idx = torch.tensor([r for r, _ in mine], device=dev)
                n_idx = torch.tensor([n for _, n in mine], device=dev)
                sel = (r_idx, ctx.pos[n_idx], ctx.feat[n_idx])
            splices.append(_Splice(s.sae, edges=sel))
        store: dict[str, Tensor] = {}
        hooks = [("blocks.0.hook_resid_pre", _input_leaf(store))] + [
            (s.hook, sp) for s, sp in zip(ctx.specs, splices, strict=True)
        ]
        with (
            torch.enable_grad(),
            _no_param_grads(ctx.model, *[s.sae for s in ctx.specs]),
            ctx.model.hooks(fwd_hooks=hooks),
        ):
            # the forward stops after the last SAE's block: nothing downstream of the nodes is needed here
            ctx.model(ctx.row_tokens(rows), return_type=None, stop_at_layer=_stop_layer(ctx.specs[-1].hook))
            acts = [sp.edge_act for sp in splices if sp.edge_act is not None]
            loss = sum(a.sum() for a in acts)
            inputs_ = [sp.f_var for sp in splices] + [sp.out for sp in splices] + [store["emb"]]
            grads = torch.autograd.grad(loss, inputs_, allow_unused=True)
        K = len(splices)
        gfe = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads[:K], inputs_[:K], strict=True)]
        goe = [
            g if g is not None else torch.zeros_like(x)
            for g, x in zip(grads[K : 2 * K], inputs_[K : 2 * K], strict=True)
        ]
        gemb = grads[2 * K] if grads[2 * K] is not None else torch.zeros_like(store["emb"])
        emb = store["emb"].detach()
        for r, (j, v) in enumerate(downstream):
            kv, qv, fv = ctx.sae_of[v].item(), ctx.pos[v].item(), ctx.feat[v].item()
            dT = gf_all[kv][row_of_p[j], qv, fv].item()  # ∂target/∂a_v, straight through
            cands = []
            for u in kept_nodes[j]:
                ku, qu = ctx.sae_of[u].item(), ctx.pos[u].item()
                if ctx.specs[ku].order >= ctx.specs[kv].order or qu > qv:
                    continue
                if ctx.kind[u] == FEATURE:
                    fu = ctx.feat[u].item()
                    raw = (ctx.f[ku][qu, fu] - ctx.base[ku][fu]).item() * gfe[ku][r, qu, fu].item()
                else:
                    raw = (ctx.err[ku][qu] @ goe[ku][r, qu]).item()
                cands.append((_node_id(ctx, u), raw))
            for q in kept_inputs[j]:
                if q <= qv:
                    cands.append((f"in:{q}", (emb[r, q] @ gemb[r, q]).item()))
            for src, raw in cands:
                edges[j].append({"source": src, "target": _node_id(ctx, v), "weight": raw * dT, "on_activation": raw})
    graphs = []
    for j, p in enumerate(ctx.positions):
        nodes = [
            {
                "id": f"in:{q}",
                "kind": "input",
                "position": q,
                "symbol": "<bos>" if q == 0 else ctx.name[q - 1],
                "column": 0,
                "influence": inputs[j, q].item(),
            }
            for q in kept_inputs[j]
        ]
        for n in kept_nodes[j]:
            k = ctx.sae_of[n].item()
            node = {
                "id": _node_id(ctx, n),
                "kind": KIND_NAMES[ctx.kind[n].item()],
                "sae": ctx.specs[k].id,
                "position": ctx.pos[n].item(),
                "column": k + 1,
                "activation": ctx.act[n].item(),
                "influence": gxa[j, n].item(),
            }
            if ctx.kind[n] == FEATURE:
                node["feature"] = ctx.feat[n].item()
                node["label"], score = _label(labels, ctx.specs[k].id, node["feature"])
                if score is not None:
                    node["label_score"] = score
                node["link"] = link.format(index=node["feature"], sae=ctx.specs[k].id)
            nodes.append(node)
        out_id = "out"
        nodes.append(
            {
                "id": out_id,
                "kind": "output",
                "position": p,
                "column": len(ctx.specs) + 1,
                "symbol": _symbol(ctx.tok, ctx.t[j].item()),
                "value": ctx.values[j].item(),
            }
        )
        es = list(edges[j]) + [
            {"source": nd["id"], "target": out_id, "weight": nd["influence"]} for nd in nodes if nd["kind"] != "output"
        ]
        top = max((abs(e["weight"]) for e in es), default=0.0)
        es = [e for e in es if abs(e["weight"]) >= edge_min * top]
        es.sort(key=lambda e: -abs(e["weight"]))
        graphs.append({"position": p, "nodes": nodes, "edges": es[:120]})
    return graphs


def _node_id(ctx: _Ctx, n: int) -> str:
    k, q = ctx.sae_of[n].item(), ctx.pos[n].item()
    kind = ctx.kind[n].item()
    if kind == FEATURE:
        return f"f:{ctx.specs[k].id}:{q}:{ctx.feat[n].item()}"
    return f"{'err' if kind == ERROR else 'bias'}:{ctx.specs[k].id}:{q}"


def _label(labels, sae_id: str, index: int) -> tuple[str, float | None]:
    """(text shown in the label column, score or None). A (concept, score) value, as `interp.monosemanticity`'s
    labels give, shows as "concept 0.93"."""
    if labels is None:
        return "", None
    value = labels(sae_id, index) if callable(labels) else labels.get((sae_id, index), labels.get(index))
    if isinstance(value, tuple):
        text, score = value
        return f"{text} {float(score):.2f}", float(score)
    return value or "", None


def _as_labels(labels, specs: list[SAESpec]):
    """The labels argument as a mapping or a function; a monosemanticity report (a `Report`, its rows, or its folder)
    becomes {(sae id, index): (best concept, Mono1)} for each SAE, checked to be this SAE's."""
    from interp.monosemanticity import Report, sae_labels

    if labels is None or callable(labels) or isinstance(labels, Mapping):
        return labels
    if isinstance(labels, Report | str | Path) or isinstance(labels, Sequence):
        return {(s.id, i): v for s in specs for i, v in sae_labels(labels, s.sae, s.hook).items()}
    raise VillesError(f"labels must be a mapping, a function or a monosemanticity report, got {type(labels).__name__}")


# --- results ---------------------------------------------------------------------------------------------------------
@dataclass
class NodeRow:
    """One line of the ranked table: a feature, or an error / bias / baseline / rest / softmax term."""

    kind: str
    scores: dict[str, float]  # method -> attribution; "ablation" is the true change
    sae: str | None = None
    position: int | None = None  # token position q of the node (0 is <bos>, q the q-th character)
    feature: int | None = None
    activation: float | None = None
    label: str = ""
    link: str | None = None
    label_score: float | None = None  # the label's score (Mono1 of the feature's best concept), when it has one


@dataclass
class Prediction:
    """The attribution of one prediction: the character at `position` of the name, after `prefix`."""

    position: int
    prefix: str
    symbol: str  # the target symbol
    actual: str  # the symbol actually next in the name
    target: str  # e.g. "log p(m)"
    value: float  # the target, clean
    top: list[tuple[str, float]]  # the model's most likely next symbols with their probabilities
    rows: list[NodeRow]  # features ranked (by |ablation| if computed), then error, bias, baseline, rest, softmax
    closure: float | None = None  # direct: |Σ terms − target|
    completeness: list[dict] | None = None  # ig: per SAE {sae, sum, change, gap}
    faithfulness: dict | None = None
    graph: dict | None = None

    def features(self) -> list[NodeRow]:
        return [r for r in self.rows if r.kind == "feature"]


@dataclass
class Attribution:
    name: str
    saes: list[str]
    methods: list[str]
    target: Target
    baseline: str
    freeze_norms: str
    predictions: list[Prediction]

    def __getitem__(self, position: int) -> Prediction:
        for p in self.predictions:
            if p.position == position:
                return p
        raise KeyError(position)

    def to_dict(self) -> dict:
        return _jsonable(
            {
                "name": self.name,
                "saes": self.saes,
                "methods": self.methods,
                "target": {"char": self.target.char, "kind": self.target.kind, "versus": self.target.versus},
                "baseline": self.baseline,
                "freeze_norms": self.freeze_norms,
                "predictions": [_pred_dict(p) for p in self.predictions],
            }
        )

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent, allow_nan=False)


def _pred_dict(p: Prediction) -> dict:
    d = {k: getattr(p, k) for k in p.__dataclass_fields__ if k != "rows"}
    d["rows"] = [{k: v for k, v in r.__dict__.items() if v is not None} for r in p.rows]
    return d


def _jsonable(x):
    """NaN/inf become null (strict JSON); tuples lists; floats rounded to 7 significant digits."""
    if isinstance(x, float):
        return float(f"{x:.7g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


# --- the one call ---------------------------------------------------------------------------------------------------
def default_methods(model: HookedTransformer, saes: SAE | Sequence[SAE] | Mapping[str, SAE]) -> list[str]:
    """Every method that applies: direct only when an SAE reads the last residual stream."""
    return _default_methods(_as_specs(model, saes))


def _default_methods(specs: Sequence[SAESpec]) -> list[str]:
    return (["direct"] if any(s.final for s in specs) else []) + ["gxa", "atp", "ig", "ablation"]


def attribute(
    model: HookedTransformer,
    saes: SAE | Sequence[SAE] | Mapping[str, SAE],
    name: str,
    position: int | Sequence[int] | None = None,
    target: Target | str | None = None,
    methods: Sequence[str] | None = None,
    *,
    tokenizer: CharTokenizer | None = None,
    baseline: str = "zero",
    means: Mapping[str, Tensor] | None = None,
    ig_steps: int = 16,
    freeze_norms: str = "final",
    faithfulness: bool = True,
    graph: bool | None = None,
    keep_ks: Sequence[int] = KEEP_KS,
    labels: Mapping | Callable[[str, int], str | tuple[str, float] | None] | str | Path | Any | None = None,
    feature_link: str = FEATURE_LINK,
    node_share: float = 0.8,
    max_graph_features: int = 8,
    edge_min: float = 0.01,
    top_predictions: int = 8,
) -> Attribution:
    """Attribute the target at `position` (None: every position) of `name` to the features of `saes`.

    methods: names in METHODS (default: direct when an SAE reads the last residual stream, gxa, ig, ablation).
    baseline: "zero" or "mean" (then `means`, {sae id (its hook): [d_sae]}, e.g. from `feature_means`).
    freeze_norms: "final" (the final norm's scale is frozen for gradients), "all", or "none".
    faithfulness: Spearman vs ablation, error share, keep-top-k curve per prediction (adds the ablation run).
    graph: the pruned attribution graph per prediction (default: when several SAEs are given).
    labels: the label column (concept labels): {(sae id, index) or index: text or (text, score)}, fn(sae id, index),
        or a monosemanticity report of these SAEs (`interp.monosemanticity.Report`, its rows, or its folder): each
        feature's best concept and Mono1 ("word=saint 0.93"; VillesError when the report was made for another SAE).
    feature_link: dashboard page of a feature, a format string with {index} and {sae}.
    """
    specs = _as_specs(model, saes)
    tok = tokenizer or model_tokenizer(model)
    target = _as_target(target)
    if not isinstance(ig_steps, int) or ig_steps < 1:
        raise VillesError(f"ig_steps must be a positive whole number, got {ig_steps!r}")
    methods = list(methods) if methods is not None else _default_methods(specs)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise VillesError(f"unknown method {unknown[0] if unknown else '(none)'!r}: choose from {', '.join(METHODS)}")
    graph = len(specs) > 1 if graph is None else graph
    labels = _as_labels(labels, specs)
    ctx = _prepare(model, tok, specs, name, position, target, baseline, means, freeze_norms, ig_steps)
    ctx.graph_rows = graph
    run = list(dict.fromkeys(methods + (["ablation"] if faithfulness else []) + (["gxa"] if graph else [])))
    scores = {m: METHODS[m](ctx) for m in run}
    faith = _faithfulness(ctx, scores, keep_ks) if faithfulness else None
    graphs = (
        _graphs(ctx, scores["gxa"], labels, feature_link, node_share, max_graph_features, edge_min) if graph else None
    )
    shown = list(dict.fromkeys(methods + (["ablation"] if faithfulness else [])))
    preds = [
        _prediction(ctx, j, scores, shown, labels, feature_link, faith, graphs, top_predictions) for j in range(ctx.P)
    ]
    return Attribution(name, [s.id for s in specs], shown, target, baseline, freeze_norms, preds)


def _prediction(ctx: _Ctx, j, scores, shown, labels, link, faith, graphs, top_n) -> Prediction:
    p = ctx.positions[j]
    rel = torch.nonzero(ctx.relevant[j], as_tuple=True)[0]
    key = "ablation" if "ablation" in shown else shown[0]
    cols = {m: scores[m][j, rel].tolist() for m in shown}
    kinds, saes, poss, feats, acts = (t[rel].tolist() for t in (ctx.kind, ctx.sae_of, ctx.pos, ctx.feat, ctx.act))
    feats_rows, others = [], []
    for r in range(len(rel)):
        sc = {m: cols[m][r] for m in shown}
        sid = ctx.specs[saes[r]].id
        if kinds[r] == FEATURE:
            fi = feats[r]
            label, label_score = _label(labels, sid, fi)
            feats_rows.append(
                NodeRow("feature", sc, sid, poss[r], fi, acts[r], label, link.format(index=fi, sae=sid), label_score)
            )
        else:
            others.append(NodeRow(KIND_NAMES[kinds[r]], sc, sid, poss[r], activation=acts[r]))
    feats_rows.sort(key=lambda r: -abs(_num(r.scores.get(key))))
    closure = None
    if "direct" in ctx.extras and "direct" in shown:
        dx = ctx.extras["direct"]
        if dx["baseline"] is not None:
            others.append(NodeRow("baseline", {"direct": dx["baseline"][j].item()}))
        others.append(NodeRow("rest", {"direct": dx["rest"][j].item()}))
        if dx["softmax"] is not None:
            others.append(NodeRow("softmax", {"direct": dx["softmax"][j].item()}))
        closure = dx["closure"][j].item()
    completeness = None
    if "ig" in ctx.extras and "ig" in shown:
        completeness = [
            {"sae": c["sae"], "sum": c["sum"][j].item(), "change": c["change"][j].item(), "gap": c["gap"][j].item()}
            for c in ctx.extras["ig"]
        ]
    probs, ids = log_probs(ctx.logits[p]).exp().topk(top_n)
    t = ctx.t[j].item()
    return Prediction(
        position=p,
        prefix=ctx.name[:p],
        symbol=_symbol(ctx.tok, t),
        actual=ctx.name[p] if p < len(ctx.name) else "<eos>",
        target=ctx.target.describe(ctx.tok, t, None if ctx.v is None else ctx.v[j].item()),
        value=ctx.values[j].item(),
        top=[(_symbol(ctx.tok, i), pr) for i, pr in zip(ids.tolist(), probs.tolist(), strict=True)],
        rows=feats_rows + others,
        closure=closure,
        completeness=completeness,
        faithfulness=faith[j] if faith else None,
        graph=graphs[j] if graphs else None,
    )


def _num(x) -> float:
    return 0.0 if x is None or not math.isfinite(x) else x


def ablated_target(
    model: HookedTransformer,
    saes: SAE | Sequence[SAE] | Mapping[str, SAE],
    name: str,
    position: int,
    ablate: Sequence[tuple[str, int, int | str]],
    target: Target | str | None = None,
    *,
    tokenizer: CharTokenizer | None = None,
    baseline: str = "zero",
    means: Mapping[str, Tensor] | None = None,
) -> float:
    """The target at `position` with the given nodes ablated together in one forward, everything else clean.
    ablate: (sae id = its hook, token position q, what), what being an active feature's index (set to its baseline),
    "features" (every active feature at q), "error" or "bias" (removed)."""
    specs = _as_specs(model, saes)
    tok = tokenizer or model_tokenizer(model)
    ctx = _prepare(model, tok, specs, name, position, _as_target(target), baseline, means, "final", 1)
    ids = [s.id for s in specs]
    mask = torch.zeros(ctx.N, device=ctx.tokens.device)
    for sid, q, what in ablate:
        if sid not in ids:
            raise VillesError(f"no SAE on {sid!r} here: the SAEs read {', '.join(ids)}")
        if not isinstance(q, int) or not 0 <= q < ctx.tokens.shape[1]:
            raise VillesError(f"token position {q!r} is outside {name!r} (0..{ctx.tokens.shape[1] - 1})")
        at = (ctx.sae_of == ids.index(sid)) & (ctx.pos == q)
        if what in ("error", "bias"):
            sel = at & (ctx.kind == (ERROR if what == "error" else BIAS))
        elif what == "features":
            sel = at & (ctx.kind == FEATURE)
        elif isinstance(what, int) and not isinstance(what, bool):
            sel = at & (ctx.kind == FEATURE) & (ctx.feat == what)
            if not bool(sel.any()):
                raise VillesError(f"feature {what} is not active at position {q} of {name!r} ({sid})")
        else:
            raise VillesError(f"cannot ablate {what!r}: give a feature index, 'features', 'error' or 'bias'")
        mask[sel] = 1.0
    return _ablated_values(ctx, mask[None])[0, 0].item()


@torch.no_grad()
def feature_means(
    model: HookedTransformer,
    saes: SAE | Sequence[SAE] | Mapping[str, SAE],
    names: Sequence[str],
    tokenizer: CharTokenizer | None = None,
    batch_size: int = 512,
) -> dict[str, Float[Tensor, " d_sae"]]:
    """Mean activation of every feature over the character positions of `names` (not <bos>, <eos> or padding: the
    positions SAEs are trained on here), for baseline="mean"."""
    specs = _as_specs(model, saes)
    tok = tokenizer or model_tokenizer(model)
    sums = {s.id: torch.zeros(s.sae.cfg.d_sae, dtype=torch.float64) for s in specs}
    count = 0
    names = list(names)
    if not names:
        raise VillesError("feature_means needs at least one name")
    stops = [_stop_layer(s.hook) for s in specs]
    stop = None if None in stops else max(stops)  # later blocks cannot change the SAEs' activations
    for start in range(0, len(names), batch_size):
        tokens = tok.batch(names[start : start + batch_size], drop_unknown=True).to(model.cfg.device)
        mask = (tokens != PAD_ID) & (tokens != BOS_ID) & (tokens != EOS_ID)
        _, cache = model.run_with_cache(tokens, names_filter=[s.hook for s in specs], stop_at_layer=stop)
        for s in specs:
            sums[s.id] += s.sae.encode(cache[s.hook][mask]).double().sum(0).cpu()
        count += int(mask.sum())
    return {k: (v / max(count, 1)).float() for k, v in sums.items()}


# --- views -----------------------------------------------------------------------------------------------------------
def _fmt(x, signed: bool = True, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _shown_symbol(s: str) -> str:
    return s if s == "<eos>" else repr(s)


def format_prediction(result: Attribution, position: int, top: int = 10) -> str:
    """The ranked table of one prediction, its closure line and its faithfulness lines."""
    pred = result[position]
    methods = result.methods
    multi = len(result.saes) > 1
    out = [
        f"{result.name} · position {pred.position}: {pred.prefix!r} → {_shown_symbol(pred.symbol)}"
        + ("" if pred.symbol == pred.actual else f" (actual next: {_shown_symbol(pred.actual)})"),
        f"{pred.target} = {pred.value:.4f}   predicted: "
        + " · ".join(f"{_shown_symbol(s)} {p:.0%}" for s, p in pred.top[:6]),
        f"SAE {', '.join(result.saes)} · baseline {result.baseline} · norms frozen for direct/gxa: "
        f"{result.freeze_norms}",
        "",
    ]
    header = ["#", "feature", *(["sae"] if multi else []), "pos", "label", "act", *methods]
    right = {0, 1, 4 + multi, *range(5 + multi, 5 + multi + len(methods))}
    right.discard(3 + multi)
    rows = []
    feats = pred.features()
    for rank, r in enumerate(feats[:top], 1):
        rows.append(
            [
                str(rank),
                str(r.feature),
                *([r.sae] if multi else []),
                str(r.position),
                r.label[:28],
                _fmt(r.activation, signed=False, digits=2),
                *(_fmt(r.scores.get(m)) for m in methods),
            ]
        )
    if len(feats) > top:
        rest = feats[top:]
        rows.append(
            [
                "",
                f"+{len(rest)} more",
                *([""] if multi else []),
                "",
                "",
                "",
                *(_fmt(sum(_num(r.scores.get(m)) for r in rest)) for m in methods),
            ]
        )
    for kind in ("error", "bias"):
        for sae in result.saes:
            group = [r for r in pred.rows if r.kind == kind and r.sae == sae]
            if not group:
                continue
            summed = len(group) > 1
            rows.append(
                [
                    "",
                    kind + (" Σpos" if summed else ""),
                    *([sae] if multi else []),
                    "" if summed else str(group[0].position),
                    "",
                    "" if summed else _fmt(group[0].activation, signed=False, digits=2),
                    *(_fmt(_nansum(r.scores.get(m) for r in group)) for m in methods),
                ]
            )
    for r in pred.rows:
        if r.kind in ("baseline", "rest", "softmax"):
            rows.append(["", r.kind, *([""] if multi else []), "", "", "", *(_fmt(r.scores.get(m)) for m in methods)])
    out.append(_table(header, rows, right))
    out.append("")
    if pred.closure is not None:
        out.append(f"closure (direct): |sum of the direct column - target| = {pred.closure:.1e}")
    for c in pred.completeness or []:
        rel = abs(c["gap"]) / abs(c["change"]) if abs(c["change"]) > 1e-9 else float("nan")
        out.append(
            f"IG completeness ({c['sae']}): Σ IG {c['sum']:+.4f} vs change {c['change']:+.4f}, gap {c['gap']:+.1e}"
            + (f" ({rel:.1%})" if math.isfinite(rel) else "")
        )
    for sae, f in (pred.faithfulness or {}).items():
        name = f" [{sae}]" if multi else ""
        sp = " · ".join(f"{m} {_fmt(v, signed=False, digits=2)}" for m, v in f["spearman"].items())
        out.append(f"faithfulness{name}: Spearman vs ablation over {f['n_features']} active features: {sp}")
        share_m = _first_finite(f["error_share"], ("direct", "gxa", "atp", "ablation"))
        share = f["error_share"].get(share_m)
        curve_m = next((m for m in ("direct", "gxa", "atp") if m in f["keep_top_k"]), "ablation")
        curve = " ".join(
            f"{k}:{v:.0%}" if v is not None and math.isfinite(v) else f"{k}:-"
            for k, v in f["keep_top_k"].get(curve_m, [])
        )
        out.append(
            f"  error share ({share_m}) {_fmt(share, signed=False, digits=3)} · keep top-k by {curve_m}, rest at "
            f"{result.baseline}, recovered of {f['change']:+.3f}: {curve}"
        )
    return "\n".join(out)


def _first_finite(values: dict, order: Sequence[str]) -> str | None:
    """The first method in `order` with a finite value (e.g. direct, else gxa for an SAE before the last layer)."""
    for m in order:
        v = values.get(m)
        if v is not None and math.isfinite(v):
            return m
    return None


def _nansum(xs) -> float:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) if vals else float("nan")


def format_summary(result: Attribution) -> str:
    """One line per prediction: target, the strongest feature, closure and faithfulness."""
    key = "ablation" if "ablation" in result.methods else result.methods[0]
    header = ["pos", "prefix", "next", "target", "top feature", key, "closure", "spearman", "err share"]
    rows = []
    for p in result.predictions:
        feats = p.features()
        best = feats[0] if feats else None
        f = next(iter((p.faithfulness or {}).values()), None)
        sp_m = _first_finite(f["spearman"], ("direct", "gxa", "atp", "ig")) if f else None
        sh_m = _first_finite(f["error_share"], ("direct", "gxa", "atp", "ablation")) if f else None
        rows.append(
            [
                str(p.position),
                p.prefix[-14:],
                _shown_symbol(p.symbol),
                f"{p.value:.3f}",
                "-" if best is None else f"{best.feature}" + (f" {best.label[:16]}" if best.label else ""),
                "-" if best is None else _fmt(best.scores.get(key)),
                "-" if p.closure is None else f"{p.closure:.0e}",
                "-" if sp_m is None else f"{sp_m} {_fmt(f['spearman'][sp_m], signed=False, digits=2)}",
                "-" if sh_m is None else f"{f['error_share'][sh_m]:.0%}",
            ]
        )
    kind = result.predictions[0].target.split("(")[0]
    title = f"{result.name}: {kind} of each next symbol · SAE {', '.join(result.saes)}"
    return title + "\n\n" + _table(header, rows, {0, 3, 5, 6})


def format_attribution(result: Attribution, position: int | None = None, top: int = 10) -> str:
    """The ranked table for one prediction (position given, or only one attributed), else the per-position summary."""
    if position is None and len(result.predictions) == 1:
        position = result.predictions[0].position
    if position is not None:
        return format_prediction(result, position, top)
    return format_summary(result)


# --- the offline HTML page -------------------------------------------------------------------------------------------
PLOTLY_FILE = "plotly.min.js"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<script src="__PLOTLY__"></script>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
.strip{display:flex;flex-wrap:wrap;gap:3px;margin:.8em 0}
.strip button{font:600 20px ui-monospace,monospace;min-width:1.8em;padding:.2em .3em;border:1px solid #bbb;
 border-radius:4px;cursor:pointer}
.strip button.on{outline:3px solid #1f77b4}
.meta{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}
td.l,th.l{text-align:left}
.row{display:flex;flex-wrap:wrap;gap:1em}.row>div{flex:1;min-width:360px}
code{background:#f4f4f4;padding:0 .2em}
</style></head><body>
<h2>__TITLE__</h2>
<div class="meta" id="meta"></div>
<div class="strip" id="strip"></div>
<div id="head"></div>
<div class="row"><div id="dist"></div><div id="bars"></div></div>
<div id="table"></div>
<div class="row"><div id="curve"></div><div id="graph"></div></div>
<script type="application/json" id="data">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const M = D.methods, key = M.includes('ablation') ? 'ablation' : M[0];
const fmt = (x, d = 3) => (x === null || x === undefined) ? '-' : (x >= 0 ? '+' : '') + x.toFixed(d);
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
document.getElementById('meta').textContent = `SAE ${D.saes.join(', ')} · target ${D.target.kind}` +
  ` · baseline ${D.baseline} · methods ${M.join(', ')} · final norm frozen for direct/gxa: ${D.freeze_norms}`;
const strip = document.getElementById('strip');
D.predictions.forEach((p, i) => {
  const b = document.createElement('button');
  b.textContent = p.actual === '<eos>' ? '⏎' : p.actual;
  const pr = Math.exp(Math.min(0, p.value));
  b.style.background = D.target.kind === 'logprob' ? `rgba(31,119,180,${(0.1 + 0.6 * pr).toFixed(2)})` : '#eef';
  b.title = `position ${p.position}: ${p.target} = ${p.value.toFixed(3)}`;
  b.onclick = () => show(i);
  strip.appendChild(b);
});
function show(i) {
  [...strip.children].forEach((b, j) => b.classList.toggle('on', i === j));
  const p = D.predictions[i];
  const f = p.faithfulness ? Object.entries(p.faithfulness) : [];
  let h = `<h3>position ${p.position}: <code>${esc(p.prefix)}</code> → <code>${esc(p.symbol)}</code>` +
    ` &nbsp; ${esc(p.target)} = ${p.value.toFixed(4)}</h3>`;
  if (p.closure !== undefined && p.closure !== null) h += `<div>closure (direct): ${p.closure.toExponential(1)}</div>`;
  (p.completeness || []).forEach(c => { h += `<div>IG completeness (${esc(c.sae)}): gap ${fmt(c.gap, 4)}` +
    ` of change ${fmt(c.change, 4)}</div>`; });
  f.forEach(([sae, x]) => {
    h += `<div>faithfulness${f.length > 1 ? ' [' + esc(sae) + ']' : ''}: Spearman vs ablation ` +
      Object.entries(x.spearman).map(([m, v]) => `${m} ${v === null ? '-' : v.toFixed(2)}`).join(' · ') +
      ` · error share ` + Object.entries(x.error_share).filter(([m, v]) => v !== null)
        .map(([m, v]) => `${m} ${(100 * v).toFixed(0)}%`).join(' · ') + `</div>`;
  });
  document.getElementById('head').innerHTML = h;
  Plotly.react('dist', [{type: 'bar', x: p.top.map(t => t[0]), y: p.top.map(t => t[1]), marker: {color: p.top.map(
    t => t[0] === p.symbol ? '#d62728' : '#1f77b4')}}], {title: {text: 'predicted distribution'}, height: 300,
    margin: {t: 40, b: 40, l: 50, r: 10}, yaxis: {tickformat: '.0%'}}, {displayModeBar: false});
  const feats = p.rows.filter(r => r.kind === 'feature').slice(0, 12).reverse();
  const ylab = feats.map(r => `#${r.feature}${D.saes.length > 1 ? ' L' + r.sae.split('.')[1] + '@' + r.position : ''}` +
    (r.label ? ' ' + r.label : ''));
  Plotly.react('bars', M.map(m => ({type: 'bar', orientation: 'h', name: m, y: ylab,
    x: feats.map(r => r.scores[m]), customdata: feats.map(r => r.link)})),
    {title: {text: 'top concepts (attribution to the target)'}, barmode: 'group', height: 120 + 26 * feats.length,
     margin: {t: 40, b: 40, l: 160, r: 10}, legend: {orientation: 'h'}, yaxis: {type: 'category'}},
    {displayModeBar: false});
  document.getElementById('bars').on('plotly_click', e => { const u = e.points[0].customdata; if (u) window.open(u); });
  let t = `<table><tr><th>#</th><th class="l">feature</th>${D.saes.length > 1 ? '<th class="l">sae</th>' : ''}` +
    `<th>pos</th><th class="l">label</th><th>act</th>${M.map(m => `<th>${m}</th>`).join('')}</tr>`;
  let shown = 0;
  p.rows.forEach((r, j) => {
    if (r.kind === 'feature' && ++shown > 25) return;
    const name = r.kind === 'feature' ? `<a href="${esc(r.link)}">#${r.feature}</a>` : r.kind;
    t += `<tr><td>${r.kind === 'feature' ? j + 1 : ''}</td><td class="l">${name}</td>` +
      (D.saes.length > 1 ? `<td class="l">${esc(r.sae || '')}</td>` : '') +
      `<td>${r.position ?? ''}</td><td class="l">${esc(r.label || '')}</td>` +
      `<td>${r.activation === undefined ? '' : r.activation.toFixed(2)}</td>` +
      M.map(m => `<td>${fmt(r.scores[m])}</td>`).join('') + '</tr>';
  });
  const more = p.rows.filter(r => r.kind === 'feature').length - 25;
  document.getElementById('table').innerHTML = t + '</table>' + (more > 0 ? `<div class="meta">${more} more ` +
    `features in the JSON (--json)</div>` : '');
  const curves = [];
  f.forEach(([sae, x]) => Object.entries(x.keep_top_k).forEach(([m, c]) => curves.push({type: 'scatter',
    mode: 'lines+markers', name: f.length > 1 ? `${m} ${sae}` : m, x: c.map(v => v[0]), y: c.map(v => v[1])})));
  Plotly.react('curve', curves, {title: {text: `keep top-k features, the others at ${D.baseline}`}, height: 320,
    xaxis: {title: {text: 'k'}}, yaxis: {title: {text: 'fraction of the change recovered'}, tickformat: '.0%'},
    margin: {t: 40, b: 50, l: 60, r: 10}}, {displayModeBar: false});
  const g = p.graph, gd = document.getElementById('graph');
  if (!g) { Plotly.purge(gd); gd.innerHTML = ''; return; }
  const cols = {}, pos = {};
  g.nodes.forEach(n => { (cols[n.column] = cols[n.column] || []).push(n); });
  Object.values(cols).forEach(ns => ns.forEach((n, k) => { pos[n.id] = [n.column, k - (ns.length - 1) / 2]; }));
  const big = Math.max(1e-9, ...g.edges.map(e => Math.abs(e.weight)));
  const traces = g.edges.map(e => ({type: 'scatter', mode: 'lines', hoverinfo: 'skip', showlegend: false,
    x: [pos[e.source][0], pos[e.target][0]], y: [pos[e.source][1], pos[e.target][1]],
    line: {width: 0.5 + 6 * Math.abs(e.weight) / big, color: e.weight >= 0 ? 'rgba(31,119,180,.6)' :
      'rgba(214,39,40,.6)'}}));
  const label = n => n.kind === 'input' ? `${n.symbol}@${n.position}` : n.kind === 'output' ? `→ ${n.symbol}` :
    n.kind === 'feature' ? `#${n.feature}@${n.position}` : `err@${n.position}`;
  traces.push({type: 'scatter', mode: 'markers+text', showlegend: false, x: g.nodes.map(n => pos[n.id][0]),
    y: g.nodes.map(n => pos[n.id][1]), text: g.nodes.map(label), textposition: 'top center',
    hovertext: g.nodes.map(n => `${n.kind} ${n.label || ''} influence ${fmt(n.influence)}`), hoverinfo: 'text',
    marker: {size: 12, color: g.nodes.map(n => ({input: '#7f7f7f', feature: '#2ca02c', error: '#ff7f0e',
      output: '#d62728'}[n.kind]))}});
  Plotly.react(gd, traces, {title: {text: 'attribution graph (edge width: |effect on the target|)'}, height: 420,
    xaxis: {tickvals: [...new Set(g.nodes.map(n => n.column))], ticktext: [...new Set(g.nodes.map(n => n.column))]
      .map(c => c === 0 ? 'inputs' : c > D.saes.length ? 'output' : D.saes[c - 1])}, yaxis: {visible: false},
    margin: {t: 40, b: 60, l: 20, r: 20}}, {displayModeBar: false});
}
show(D.start ?? 0);
</script></body></html>
"""


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # a page to be served or opened by others, not a secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_html(result: Attribution, path: Path | str, start: int | None = None) -> Path:
    """An offline page: the name as a strip of characters; a position shows the predicted distribution, the top
    concepts (bars linking to their dashboard pages), the table, the keep-top-k curve and the graph when there is
    one. plotly.js is written once beside the page (plotly.min.js), never fetched from a CDN."""
    import plotly.offline

    path = Path(path)
    js = path.parent / PLOTLY_FILE
    bundle = plotly.offline.get_plotlyjs()
    if not js.is_file() or js.stat().st_size != len(bundle.encode("utf-8")):
        _atomic_write(js, bundle)
    data = result.to_dict()
    positions = [p.position for p in result.predictions]
    data["start"] = positions.index(start) if start in positions else len(positions) - 1
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    title = html.escape(f"{result.name}: which concepts made each letter")
    page = _PAGE.replace("__TITLE__", title).replace("__PLOTLY__", PLOTLY_FILE).replace("__DATA__", payload)
    _atomic_write(path, page)
    return path
