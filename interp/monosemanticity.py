"""Neuron-vs-feature monosemanticity: every unit scored against the automatic concept bank (`interp.concepts`), with
controls scored the same way.

Units (kinds). `feature`: the latents of an SAE (any SAELens `SAE`) at its hook. `neuron`: every MLP neuron
(`blocks.L.mlp.hook_post`). `residual`: the basis directions of the SAE's input space, both signs (unit i < d is +e_i,
unit d + i is -e_i; `basis` when that hook is not a residual stream). Controls: `random_direction` (random unit
vectors in the SAE's input space, as many as the basis units), `neuron_topk` (each layer's neurons with all but the
k largest zeroed at every position, k = the SAE's k or its mean L0: the sparsity of the SAE without its learned
dictionary) and `random_model_feature` (an SAE trained with the same settings on the same hook of the same
architecture at its random initialisation). Activations are read at the bank's rows: the characters of every name
(see `interp.concepts` for the alignment).

Scores (names split in two halves A/B by a seeded permutation; concepts in canonical id order, so a reordered bank
gives the same result):
- Mono1, held-out best-concept F1. On A, choose the concept c* and the threshold θ (grid 0, 0.1, …, 0.9 of the unit's
  maximum on A) that maximize F1 of "activation > θ·max" as a detector of c*; Mono1 is that detector's F1 on B. Ties
  go to the first concept in id order, then the lower θ.
- On B, for c*: `mass_share` (share of the positive activation mass on c*'s rows), `lift` (mass share / c*'s
  prevalence) and `r` (point-biserial correlation of the raw activation with c*'s label).
- Mono2, polysemanticity gain: F1(c1) / F1(c1 ∨ c2 ∨ c3) on B. On A, concepts are added greedily (each time the one,
  with its best θ, that most raises the F1 of the union; at most `max_extra`, only while it rises) among concepts
  *unrelated* to those already chosen: Jaccard overlap < 0.1 with each (so a different character in the same family
  qualifies, while "last2=nt" does not extend "char=t"). 1: one concept explains the unit; low: a union of unrelated
  concepts explains it better. (On B the ratio can pass 1 a little: a union chosen on A that does not generalize.)
- Flags: `dead` (active, i.e. > 0, on fewer than 15 rows of the corpus), `dense` (active on more than 10% of them).
  Summaries leave flagged units out (the "all" rows keep the dense ones, so dense kinds such as basis directions are
  still compared).
- Name level: activations averaged over each name's characters, scored the same way (Mono1 only) against the
  name-level concepts (regions): `name_concept`, `name_mono1`.

Speed. Only positive activations can pass a threshold, so counting works on the (row, unit) entries with a > 0, each
put in its threshold bin (how many grid values a/max exceeds). Label slots are merged into a few joint columns (the
distinct combinations that occur, at most `joint_classes` each), one `bincount` per joint column gives, for every
unit, bin and joint class, the number of entries, and concept counts are sums over joint classes. The cost is
(active entries) × (joint columns), not rows × units × concepts × thresholds. Mono2's greedy steps count only the
entries inside the union so far and subtract them; co-occurrences come from the joint columns too. Sparse units (SAE
latents, top-k neurons) are scored from their entries without ever being densified (`Scorer.score_sparse`), and a
plain TopK SAE's latents come straight from its top-k pre-activations. On the shipped model (2 layers, d_model 128,
35k names, 421k positions, 781 concepts) the 3,328 units of model and SAE take about 55 s of one loaded CPU core,
forward pass (about 15 s) and SAE encoding (about 9 s) included; `bench/monosemanticity.py` measures it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.concepts import ConceptLabels
from training.errors import VillesError

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

MAIN_KINDS = ("feature", "neuron", "residual", "basis")
CONTROL_KINDS = ("random_direction", "neuron_topk", "random_model_feature")


@dataclass(frozen=True)
class MonoSettings:
    n_thresholds: int = 10  # θ grid 0, 1/n, …, (n-1)/n of the unit's maximum on half A
    split_seed: int = 0  # the A/B halves of the names
    dead_below: int = 15  # active on fewer rows: dead
    dense_above: float = 0.1  # active on a larger fraction of rows: dense
    max_extra: int = 2  # Mono2: concepts added to c1 at most
    jaccard_max: float = 0.1  # Mono2: an added concept overlaps each chosen one less than this (Jaccard)
    unit_chunk: int = 256  # units scored together (memory: rows × chunk floats)
    joint_classes: int = 1024  # most distinct label combinations per joint column
    n_random: int | None = None  # random directions; None: 2 × the SAE's d_in (as many as the basis units)
    topk: int | None = None  # neuron_topk's k; None: the SAE's k, else its mean L0 rounded
    seed: int = 0  # random directions
    workers: int = 2  # threads scoring unit chunks side by side (torch releases the GIL; results do not depend on it)

    def validate(self) -> None:
        if self.workers < 1:
            raise VillesError(f"workers must be >= 1, got {self.workers}")
        if not 1 <= self.n_thresholds <= 1000:
            raise VillesError(f"n_thresholds must be in 1..1000, got {self.n_thresholds}")
        if self.dead_below < 0 or not 0 < self.dense_above <= 1:
            raise VillesError("dead_below must be >= 0 and dense_above in (0, 1]")
        if not 0 <= self.max_extra <= 2 or not 0 < self.jaccard_max <= 1:
            raise VillesError("max_extra must be in 0..2 and jaccard_max in (0, 1]")
        if self.unit_chunk <= 0 or self.joint_classes <= 0:
            raise VillesError("unit_chunk and joint_classes must be positive")
        if self.n_random is not None and self.n_random < 0:
            raise VillesError(f"n_random must be >= 0, got {self.n_random}")
        if self.topk is not None and self.topk <= 0:
            raise VillesError(f"topk must be positive, got {self.topk}")


# --- units ----------------------------------------------------------------------------------------------------------
@dataclass
class UnitSet:
    """Units of one kind at one hook, produced a chunk of units at a time (rows: the bank's positions)."""

    kind: str
    hook: str
    n_units: int
    chunk: Callable[[int, int], Float[Tensor, "row unit"]]
    names: Callable[[int], str] = field(default=lambda i: str(i))
    n_entries: int = 0  # sparse sets: stored nonzero activations
    ordered: bool = False  # rows come in a Scorer's order (half A, then half B) rather than the bank's
    entries: Callable[[int, int], tuple[Tensor, Tensor, Tensor]] | None = None  # sparse sets: (row, unit - s, value)

    @classmethod
    def dense(cls, kind: str, hook: str, acts: Float[Tensor, "row unit"]) -> UnitSet:
        return cls(kind, hook, acts.shape[1], lambda s, e: acts[:, s:e].float())

    @classmethod
    def projection(
        cls, kind: str, hook: str, x: Float[Tensor, "row d"], directions: Float[Tensor, "d unit"], names=None
    ) -> UnitSet:
        return cls(kind, hook, directions.shape[1], lambda s, e: x @ directions[:, s:e], names or (lambda i: str(i)))

    @classmethod
    def sparse(cls, kind: str, hook: str, rows: Tensor, cols: Tensor, vals: Tensor, n_rows: int, n_units: int):
        """From (row, unit, value) entries; chunks are densified on demand."""
        order = torch.argsort(cols, stable=True)
        rows, cols, vals = rows[order], cols[order], vals[order]

        def entries(s: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
            lo, hi = (int(i) for i in torch.searchsorted(cols, torch.tensor([s, e])))
            return rows[lo:hi], cols[lo:hi] - s, vals[lo:hi]

        def chunk(s: int, e: int) -> Tensor:
            r, c, v = entries(s, e)
            out = torch.zeros(n_rows, e - s)
            out[r, c] = v
            return out

        return cls(kind, hook, n_units, chunk, n_entries=len(vals), entries=entries)


def _as_units(acts) -> UnitSet:
    if isinstance(acts, UnitSet):
        return acts
    if isinstance(acts, Tensor) and acts.ndim == 2:
        return UnitSet.dense("unit", "", acts)
    raise VillesError("activations must be a [rows, units] tensor or a UnitSet")


# --- the scoring core -----------------------------------------------------------------------------------------------
@dataclass
class _Half:
    rows: Tensor  # row indices of the half
    dense: Bool[Tensor, "row concept"]  # labels, row-major (a unit's concept column for each of its entries)
    dense_t: Bool[Tensor, "concept row"]  # the same, concept-major (a concept's rows)
    slots: Int[Tensor, "row slot"]
    pos: Tensor  # concept counts on the half (int64)

    @classmethod
    def of(cls, rows: Tensor, dense: Tensor, slots: Tensor, n_concepts: int) -> _Half:
        local = slots[rows]
        pos = torch.bincount(local[local >= 0].long(), minlength=n_concepts)
        d = dense[rows]
        return cls(rows, d, d.T.contiguous(), local, pos)

    def rows_of(self, c: int) -> Tensor:
        return self.dense_t[c].nonzero().squeeze(1)

    def labels_at(self, e: _Entries, concepts: Int[Tensor, "unit"]) -> Bool[Tensor, "entry"]:
        """For each entry, the label of its unit's concept (`concepts[u]`; False where it is -1) at its row. Few
        entries (sparse units): one gather per entry in the row-major label matrix (entries come in row order, so it
        is read almost sequentially). Many (dense units, a fifth of the cells or more): the units' label columns are
        copied into a [rows, units] table first, which the entries then read in order (about 3× faster there)."""
        missing = bool((concepts < 0).any())
        if e.flat is not None and 5 * len(e.n) > self.dense.shape[0] * len(concepts):
            table = self.dense_t.index_select(0, concepts.clamp(min=0) if missing else concepts).T.contiguous()
            out = table.view(-1)[e.flat]
            return out & (concepts >= 0).index_select(0, e.u) if missing else out
        c = concepts.index_select(0, e.u)
        if e.offset is None:  # the entries' row offsets in the label matrix, kept for the next lookups
            e.offset = e.n * self.dense.shape[1]
        out = self.dense.view(-1)[e.offset + (c.clamp(min=0) if missing else c)]
        return out & (c >= 0) if missing else out


@dataclass
class _Entries:
    """The positive activations of a chunk on one half, in row order (then unit order): row (in the half), unit,
    threshold bin (1..G: how many grid values a/max exceeds), value."""

    n: Tensor
    u: Tensor
    bin: Tensor
    val: Tensor
    offset: Tensor | None = None  # n × concepts (set by `_Half.labels_at`)
    flat: Tensor | None = None  # n × units + u, for entries of a dense chunk

    @classmethod
    def of(cls, x: Float[Tensor, "row unit"], scale: Float[Tensor, "unit"], G: int) -> _Entries:
        U = x.shape[1]
        flat = (x > 0).view(-1).nonzero().squeeze(1)
        out = cls.parts(flat // U, flat % U, x.view(-1)[flat], scale, G)
        out.flat = flat
        return out

    @classmethod
    def parts(cls, n: Tensor, u: Tensor, val: Tensor, scale: Float[Tensor, "unit"], G: int) -> _Entries:
        # fired at θ_j = j/G (a > θ_j · max)  iff  bin > j; above the maximum of A (on B) the bin stays G
        bins = torch.ceil(val * scale[u]).clamp_(1, G).to(torch.int32)
        return cls(n, u, bins, val)


class Scorer:
    """Everything about the labels that does not depend on the units: halves, joint columns, co-occurrences."""

    def __init__(self, labels: ConceptLabels, groups: Int[Tensor, "row"], settings: MonoSettings = MonoSettings()):
        settings.validate()
        if groups.shape != (labels.n_rows,):
            raise VillesError(f"{labels.n_rows} label rows but {tuple(groups.shape)} name ids")
        if labels.n_concepts == 0:
            raise VillesError("the concept bank is empty")
        self.settings = settings
        order = sorted(range(labels.n_concepts), key=lambda i: labels.ids[i])  # canonical: bank order is irrelevant
        self.labels = labels.select(order)
        self.ids, self.families = self.labels.ids, self.labels.families
        self.n_rows, self.C = labels.n_rows, labels.n_concepts
        self.G = settings.n_thresholds
        groups = groups.long()
        if groups.numel() and int(groups.min()) < 0:
            raise VillesError("name ids must be >= 0")
        uniq = torch.unique(groups)
        if len(uniq) < 2:
            raise VillesError("scoring needs at least two names (one per half)")
        gen = torch.Generator().manual_seed(settings.split_seed)
        half_a = uniq[torch.randperm(len(uniq), generator=gen)[: len(uniq) // 2]]
        is_a = torch.zeros(int(groups.max()) + 1, dtype=torch.bool)
        is_a[half_a] = True
        in_a = is_a[groups]
        self.in_a = in_a
        dense = self.labels.dense()
        slots = self.labels.slots
        self.halves = {
            key: _Half.of(mask.nonzero().squeeze(1), dense, slots, self.C) for key, mask in (("A", in_a), ("B", ~in_a))
        }
        # rows of half A, then of half B: activations in this order are split by views, not copies
        self.order = torch.cat([self.halves["A"].rows, self.halves["B"].rows])
        self.rank = torch.empty_like(self.order)  # a bank row's place in that order
        self.rank[self.order] = torch.arange(len(self.order))
        a = self.halves["A"]
        # two ways to count: slot columns merged into few joint columns (cheap per entry, a fixed cost per class),
        # or one column per slot (the reverse); each chunk takes the cheaper for its number of entries
        self.layouts = [_joint_columns(a.slots, settings.joint_classes), _joint_columns(a.slots, 1)]
        for layout in self.layouts:  # int32 classes: half the memory traffic of the per-entry gathers
            for i, (code, k, pk, pc) in enumerate(layout):
                layout[i] = (code.to(torch.int32), k, pk, pc)
        self.joint = self.layouts[0]
        self.cooc = _cooccurrence(self.joint, self.C)  # [C, C] rows shared on A
        pos = a.pos.double()
        union = pos[:, None] + pos[None, :] - self.cooc.double()
        self.jaccard = torch.where(union > 0, self.cooc.double() / union.clamp(min=1), torch.zeros(()))

    # -- counting
    def layout(self, n_entries: int, n_units: int) -> list:
        """The joint columns that count n_entries entries of n_units units at the least cost (a rough model: one
        operation per entry and column, one per class cell and per (class, concept) pair cell)."""
        width = n_units * self.G

        def cost(layout) -> int:
            return n_entries * len(layout) + sum(k + len(pk) for _, k, pk, _ in layout) * width

        return min(self.layouts, key=cost)

    def histogram(
        self, layout: list, classes: list[Tensor], ubin: Tensor, n_units: int
    ) -> Int[Tensor, "concept unit bin"]:
        """Entries of half A (their class in each joint column of `layout`, and unit * G + bin - 1) counted per
        concept: H[c, u, b]."""
        width = n_units * self.G
        out = torch.zeros(self.C, width, dtype=torch.long)
        for cls_, (_, k, pair_k, pair_c) in zip(classes, layout, strict=True):
            counts = torch.bincount(cls_ * width + ubin, minlength=k * width).view(k, width)
            out.index_add_(0, pair_c, counts[pair_k])
        return out.view(self.C, n_units, self.G)

    def classes(self, layout: list, n: Tensor) -> list[Tensor]:
        return [code.index_select(0, n) for code, *_ in layout]

    def triple(self, c1: Tensor, c2: Tensor) -> Int[Tensor, "pair concept"]:
        """|c1 ∧ c2 ∧ c| on A for each (c1, c2) pair."""
        a = self.halves["A"]
        out = torch.zeros(len(c1), self.C, dtype=torch.long)
        for i, (x, y) in enumerate(zip(c1.tolist(), c2.tolist(), strict=True)):
            both = (a.dense_t[x] & a.dense_t[y]).nonzero().squeeze(1)
            s = a.slots[both]
            out[i] = torch.bincount(s[s >= 0].long(), minlength=self.C)
        return out

    def union_count(self, chosen: Int[Tensor, "unit k"]) -> Tensor:
        """|c1 ∨ c2 ∨ …| on B for each unit's chosen concepts (-1: none)."""
        b = self.halves["B"]
        out = b.pos[chosen[:, 0].clamp(min=0)].clone()
        multi = (chosen[:, 1:] >= 0).any(1)
        if bool(multi.any()):
            tuples, which = torch.unique(chosen[multi], dim=0, return_inverse=True)
            sizes = torch.zeros(len(tuples), dtype=torch.long)
            for i, t in enumerate(tuples.tolist()):
                rows = b.dense_t[t[0]].clone()
                for c in t[1:]:
                    if c >= 0:
                        rows |= b.dense_t[c]
                sizes[i] = int(rows.sum())
            out[multi] = sizes[which]
        return out

    # -- one chunk of units
    def score_chunk(self, acts: Float[Tensor, "row unit"], greedy: bool = True, ordered: bool = False):
        """Scores of a chunk of units (rows in bank order, or in `self.order` when `ordered`): a dict of tensors."""
        G = self.G
        acts = acts.float()
        if not ordered:
            acts = acts.index_select(0, self.order)
        acts = acts.contiguous()
        n_a = len(self.halves["A"].rows)
        xa, xb = acts[:n_a], acts[n_a:]
        top = xa.amax(0)
        scale = torch.where(top > 0, G / top.clamp(min=1e-30), torch.zeros(()))
        ea, eb = _Entries.of(xa, scale, G), _Entries.of(xb, scale, G)
        return self._score(ea, eb, top, greedy, xb if bool((xb < 0).any()) else None)

    def score_sparse(
        self, rows: Int[Tensor, "entry"], cols: Int[Tensor, "entry"], vals: Float[Tensor, "entry"], n_units: int,
        greedy: bool = True, ordered: bool = False,
    ):  # fmt: skip
        """The same scores for units given by their nonzero (row, unit, value) entries, values >= 0 (zero elsewhere:
        an SAE's latents), without densifying them: the cost is the number of entries, not rows × units."""
        G = self.G
        rows = rows.long() if ordered else self.rank.index_select(0, rows.long())
        keep = vals > 0
        rows, cols, vals = rows[keep], cols[keep].long(), vals[keep].float()
        order = torch.argsort(rows * n_units + cols)  # row order, as the dense path has them
        rows, cols, vals = rows[order], cols[order], vals[order]
        n_a = len(self.halves["A"].rows)
        in_a = rows < n_a
        top = torch.zeros(n_units).scatter_reduce_(0, cols[in_a], vals[in_a], "amax")
        scale = torch.where(top > 0, G / top.clamp(min=1e-30), torch.zeros(()))
        ea = _Entries.parts(rows[in_a], cols[in_a], vals[in_a], scale, G)
        out = ~in_a
        eb = _Entries.parts(rows[out] - n_a, cols[out], vals[out], scale, G)
        return self._score(ea, eb, top, greedy, None)

    def _score(self, ea: _Entries, eb: _Entries, top: Tensor, greedy: bool, xb: Tensor | None) -> dict:
        """The scores from the positive entries of half A and B; `xb` (the dense activations on B) only when some
        are negative (then r needs every row)."""
        G, C = self.G, self.C
        U = top.shape[0]
        A, B = self.halves["A"], self.halves["B"]
        scorable = top > 0
        n_active = torch.bincount(ea.u, minlength=U) + torch.bincount(eb.u, minlength=U)

        # half A: c1 and θ1
        ubin = (ea.u * G).to(torch.int32) + ea.bin - 1
        layout = self.layout(len(ubin), U)
        classes = self.classes(layout, ea.n)
        fired = _rev_cumsum(torch.bincount(ubin, minlength=U * G).view(U, G))  # P[u, j]
        hist = self.histogram(layout, classes, ubin, U)  # [C, U, G] entries per concept, unit, bin
        tp = _rev_cumsum(hist)
        pos = A.pos.double()
        f1 = 2 * tp.double() / (fired.double()[None] + pos[:, None, None]).clamp(min=1)
        f1[pos == 0] = -1.0
        best = f1.permute(1, 0, 2).reshape(U, C * G).argmax(1)
        c1, j1 = best // G, best % G
        uu = torch.arange(U)
        f1_a = f1[c1, uu, j1]
        chosen = torch.full((U, 1 + self.settings.max_extra), -1, dtype=torch.long)
        chosen[:, 0] = c1
        j_union = j1.clone()
        f1_union_a = f1_a.clone()

        # half A: Mono2's greedy union
        if greedy and self.settings.max_extra:
            tp_s = tp[c1, uu].double()  # [U, G] TP of the union so far
            pos_s = pos[c1].clone()
            active = scorable.clone()
            inside = A.labels_at(ea, c1)  # entries on the rows of the union so far
            for step in range(1, 1 + self.settings.max_extra):
                if not bool(active.any()):
                    break
                prior = chosen[:, :step]
                if step > 1:
                    inside |= A.labels_at(ea, prior[:, step - 1])
                # entries outside the union = all entries - those inside it (usually the few)
                keep = inside.nonzero().squeeze(1)
                kept = [k.index_select(0, keep) for k in classes]
                x = _rev_cumsum(hist - self.histogram(layout, kept, ubin.index_select(0, keep), U)).double()
                inter = self.cooc[prior[:, 0]].double()  # [U, C]: |c ∧ (union so far)|
                allowed = (self.jaccard[prior[:, 0]] < self.settings.jaccard_max) & (pos > 0)[None]
                for s in range(1, step):  # |c ∧ (c1 ∨ c2)| = |c ∧ c1| + |c ∧ c2| - |c ∧ c1 ∧ c2|
                    inter += self.cooc[prior[:, s]].double()
                    allowed &= self.jaccard[prior[:, s]] < self.settings.jaccard_max
                if step == 2:
                    pairs, which = torch.unique(prior[active], dim=0, return_inverse=True)
                    inter[active] -= self.triple(pairs[:, 0], pairs[:, 1]).double()[which]
                denom = fired.double()[None] + (pos_s[:, None] + pos[None, :] - inter).T[:, :, None]
                cand = 2 * (tp_s[None] + x) / denom.clamp(min=1)  # [C, U, G]
                cand[~allowed.T] = -1.0
                best = cand.permute(1, 0, 2).reshape(U, C * G).argmax(1)
                c, j = best // G, best % G
                take = active & (cand[c, uu, j] > f1_union_a + 1e-12)
                chosen[take, step] = c[take]
                j_union = torch.where(take, j, j_union)
                f1_union_a = torch.where(take, cand[c, uu, j], f1_union_a)
                tp_s = torch.where(take[:, None], tp_s + x[c, uu], tp_s)
                pos_s = torch.where(take, pos_s + pos[c] - inter[uu, c], pos_s)
                active &= take

        # held-out half B, from its entries (only positive activations can fire)
        lab1 = B.labels_at(eb, c1)
        fire1 = eb.bin > j1.to(torch.int32)[eb.u]
        mono1 = _f1_counts(eb.u, fire1 & lab1, fire1, B.pos[c1], U)
        lab_u = lab1.clone()
        for s in range(1, chosen.shape[1]):
            if bool((chosen[:, s] >= 0).any()):
                lab_u |= B.labels_at(eb, chosen[:, s])
        fire_u = eb.bin > j_union.to(torch.int32)[eb.u]
        f1_union_b = _f1_counts(eb.u, fire_u & lab_u, fire_u, self.union_count(chosen), U)
        mono2 = torch.where(f1_union_b > 0, mono1 / f1_union_b.clamp(min=1e-30), torch.full_like(mono1, float("nan")))
        mass = torch.bincount(eb.u, weights=eb.val.double(), minlength=U)
        mass_in = torch.bincount(eb.u[lab1], weights=eb.val[lab1].double(), minlength=U)
        share = mass_in / mass.clamp(min=1e-30)
        prevalence = B.pos[c1].double() / max(len(B.rows), 1)
        lift = share / prevalence.clamp(min=1e-30)
        if xb is not None:
            r = self._point_biserial(xb, c1)
        else:  # zero wherever no entry: every sum comes from the entries
            r = _pearson(eb.u, eb.val.double(), lab1, B.pos[c1], len(B.rows), U)
        nan = torch.full((U,), float("nan"), dtype=torch.float64)
        return {
            "n_active": n_active,
            "density": n_active.double() / self.n_rows,
            "max_a": top.double(),
            "concept": torch.where(scorable, c1, torch.full_like(c1, -1)),
            "theta": torch.where(scorable, j1.double() / G, nan),
            "f1_a": torch.where(scorable, f1_a, nan),
            "mono1": torch.where(scorable, mono1, nan),
            "mono2": torch.where(scorable, mono2, nan),
            "union": torch.where(scorable[:, None], chosen, torch.full_like(chosen, -1)),
            "theta_union": torch.where(scorable, j_union.double() / G, nan),
            "f1_union_a": torch.where(scorable, f1_union_a, nan),
            "f1_union_b": torch.where(scorable, f1_union_b, nan),
            "mass_share": torch.where(scorable, share, nan),
            "lift": torch.where(scorable, lift, nan),
            "r": torch.where(scorable, r, nan),
        }

    def _point_biserial(self, xb: Float[Tensor, "row unit"], c1: Tensor) -> Float[Tensor, "unit"]:
        """Pearson correlation of each unit's activation on B with its c1 label (centred sums: float32 is enough
        for the squares; the label side is a sum over the concept's rows only)."""
        B = self.halves["B"]
        n = xb.shape[0]
        mean32 = xb.sum(0) / n
        var = (xb - mean32).square_().sum(0).double() / n  # (torch.var_mean over dim 0 is several times slower)
        mean = mean32.double()
        in_c = torch.zeros(xb.shape[1], dtype=torch.float64)
        for c in torch.unique(c1).tolist():
            units = (c1 == c).nonzero().squeeze(1)
            rows = B.rows_of(c)
            in_c[units] = xb[rows][:, units].double().sum(0)
        p = B.pos[c1].double() / n
        cov = in_c / n - mean * p
        denom = (var * p * (1 - p)).sqrt()
        return torch.where(denom > 1e-12, cov / denom.clamp(min=1e-30), torch.zeros_like(cov))


def _pearson(u: Tensor, val: Tensor, lab: Tensor, positives: Tensor, n: int, U: int) -> Float[Tensor, "unit"]:
    """Point-biserial r of units that are zero outside their entries (u, val), with a label per entry (lab) and
    `positives` labelled rows in all."""
    mean = torch.bincount(u, weights=val, minlength=U) / n
    sq = torch.bincount(u, weights=val * val, minlength=U) / n
    var = (sq - mean * mean).clamp(min=0)
    in_c = torch.bincount(u[lab], weights=val[lab], minlength=U) / n
    p = positives.double() / n
    cov = in_c - mean * p
    denom = (var * p * (1 - p)).sqrt()
    return torch.where(denom > 1e-12, cov / denom.clamp(min=1e-30), torch.zeros_like(cov))


def _f1_counts(u: Tensor, hit: Tensor, fired: Tensor, positives: Tensor, U: int) -> Float[Tensor, "unit"]:
    tp = torch.bincount(u[hit], minlength=U).double()
    denom = torch.bincount(u[fired], minlength=U).double() + positives.double()
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))


def _rev_cumsum(x: Tensor) -> Tensor:
    """Sum over bins >= j along the last axis."""
    return x.flip(-1).cumsum(-1).flip(-1)


def _dense_inverse(x: Tensor) -> tuple[int, Tensor]:
    """(number of distinct values, index of each value among them) for small non-negative integers: a lookup table
    instead of torch.unique's sort."""
    present = torch.bincount(x) > 0
    remap = present.long().cumsum(0) - 1
    return int(present.sum()), remap[x]


def _joint_columns(slots: Int[Tensor, "row slot"], limit: int) -> list[tuple[Tensor, int, Tensor, Tensor]]:
    """Merge consecutive slot columns while their distinct combinations stay <= limit. Each joint column is
    (class of each row, number of classes, pairs (class, concept) saying which concepts a class carries)."""
    out = []
    cols: list[int] = []
    code = None

    def close(cols: list[int], code: Tensor) -> None:
        k = int(code.max()) + 1
        rep = torch.zeros(k, dtype=torch.long).scatter_(0, code, torch.arange(len(code)))
        pk, pc = [], []
        for col in cols:
            vals = slots[rep, col].long()
            keep = vals >= 0
            pk.append(torch.arange(k)[keep])
            pc.append(vals[keep])
        out.append((code, k, torch.cat(pk), torch.cat(pc)))

    for s in range(slots.shape[1]):
        v = slots[:, s].long() + 1
        if code is None:
            code, cols = _dense_inverse(v)[1], [s]
            continue
        k, inverse = _dense_inverse(code * (int(v.max()) + 1) + v)
        if k > limit:
            close(cols, code)
            code, cols = _dense_inverse(v)[1], [s]
        else:
            code = inverse
            cols.append(s)
    if code is not None:
        close(cols, code)
    return out


def _membership(k: int, pair_k: Tensor, pair_c: Tensor, n_concepts: int) -> Float[Tensor, "cls concept"]:
    m = torch.zeros(k, n_concepts)
    m[pair_k, pair_c] = 1.0
    return m


def _cooccurrence(joint: list[tuple[Tensor, int, Tensor, Tensor]], n_concepts: int) -> Int[Tensor, "concept concept"]:
    """Rows shared by every pair of concepts, from the joint columns: for columns g, h, the number of rows in each
    (class of g, class of h) pair, mapped to concepts through the classes' memberships. (float32 is exact here: every
    sum is a count of rows, far below 2**24.)"""
    out = torch.zeros(n_concepts, n_concepts)
    members = [_membership(k, pk, pc, n_concepts) for _, k, pk, pc in joint]
    for g, (code_g, k_g, _, _) in enumerate(joint):
        sizes = torch.bincount(code_g, minlength=k_g).float()
        out += (members[g] * sizes[:, None]).T @ members[g]
        for h in range(g + 1, len(joint)):
            code_h, k_h = joint[h][0], joint[h][1]
            pairs = torch.bincount(code_g * k_h + code_h, minlength=k_g * k_h).view(k_g, k_h).float()
            cross = members[g].T @ (pairs @ members[h])
            out += cross + cross.T
    return out.round().long()


# --- scoring units against labels -----------------------------------------------------------------------------------
ROW_FIELDS = (
    "kind", "hook", "index", "unit", "concept", "family", "theta", "mono1", "f1_a", "mono2", "union", "theta_union",
    "mass_share", "lift", "r", "n_active", "density", "flags", "name_concept", "name_theta", "name_mono1",
)  # fmt: skip


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="unit", disable=not enabled, leave=False)


def score(
    acts: Float[Tensor, "row unit"] | UnitSet | Sequence[UnitSet],
    labels: ConceptLabels | Bool[Tensor, "row concept"],
    name_ids: Int[Tensor, "row"],
    *,
    concept_ids: Sequence[str] | None = None,
    families: Sequence[str] | None = None,
    name_labels: ConceptLabels | None = None,
    settings: MonoSettings = MonoSettings(),
    scorer: Scorer | None = None,
    progress: bool = False,
    timings: dict[str, list[float]] | None = None,
) -> list[dict]:
    """One row per unit (see ROW_FIELDS): Mono1, Mono2, mass share, lift, r, flags, and the name-level concept when
    `name_labels` (rows: names 0..n-1, the ids in `name_ids`) is given.

    `acts` is a [rows, units] tensor, a UnitSet or several; `labels` a ConceptLabels or a boolean [rows, concepts]
    matrix with `concept_ids` (and optionally `families`); rows are positions, `name_ids` their name. A UnitSet with
    `ordered` gives its rows in `scorer.order` (pass that `scorer`, built on the same labels, name ids and settings).
    `timings`, when given, collects [wall s, CPU s] per "kind hook"."""

    if isinstance(labels, Tensor):
        if concept_ids is None:
            raise VillesError("a label matrix needs concept_ids")
        labels = ConceptLabels.from_dense(labels, concept_ids, families)
    unit_sets = [acts] if isinstance(acts, UnitSet | Tensor) else list(acts)
    unit_sets = [_as_units(u) for u in unit_sets]
    name_ids = name_ids.long()
    for us in unit_sets:
        probe = us.chunk(0, min(1, us.n_units))
        if probe.shape[0] != labels.n_rows:
            raise VillesError(f"{us.kind} activations have {probe.shape[0]} rows but the labels have {labels.n_rows}")
        if not torch.isfinite(probe).all():
            raise VillesError(f"{us.kind} activations hold NaN or infinite values")
    scorer = scorer or Scorer(labels, name_ids, settings)
    if any(us.ordered for us in unit_sets) and scorer.n_rows != labels.n_rows:
        raise VillesError("ordered activations need the scorer of these labels")
    name_scorer = None
    n_names = int(name_ids.max()) + 1
    if name_labels is not None and name_labels.n_concepts:
        if name_labels.n_rows != n_names:
            raise VillesError(f"{name_labels.n_rows} name-level label rows but {n_names} names")
        name_scorer = Scorer(name_labels, torch.arange(n_names), settings)
        lengths = torch.bincount(name_ids, minlength=n_names).clamp(min=1).float()

    def score_task(us: UnitSet, start: int, stop: int) -> tuple[dict, dict | None, float, float]:
        t0 = (time.perf_counter(), time.thread_time())
        ids = name_ids[scorer.order] if us.ordered else name_ids
        sparse = us.entries(start, stop) if us.entries is not None else None
        if sparse is not None and bool((sparse[2] < 0).any()):
            sparse = None  # negative values: zero is not "inactive", every row counts
        if sparse is not None:
            r, c, v = sparse
            if not torch.isfinite(v).all():
                raise VillesError(f"{us.kind} activations hold NaN or infinite values")
            out = scorer.score_sparse(r, c, v, stop - start, ordered=us.ordered)
            sums = torch.zeros(n_names, stop - start).index_put_((ids[r], c.long()), v.float(), accumulate=True)
        else:
            chunk = us.chunk(start, stop)
            if not torch.isfinite(chunk.sum(0)).all():  # a NaN or an infinity makes its column's sum one
                raise VillesError(f"{us.kind} activations hold NaN or infinite values")
            out = scorer.score_chunk(chunk, ordered=us.ordered)
            sums = torch.zeros(n_names, chunk.shape[1]).index_add_(0, ids, chunk) if name_scorer else None
            del chunk
        name_out = None
        if name_scorer is not None:
            name_out = name_scorer.score_chunk(sums / lengths[:, None], greedy=False)
        return out, name_out, time.perf_counter() - t0[0], time.thread_time() - t0[1]

    tasks = [
        (us, start, min(start + settings.unit_chunk, us.n_units))
        for us in unit_sets
        for start in range(0, us.n_units, settings.unit_chunk)
    ]
    rows: list[dict] = []
    # chunks are independent and the scorer is read-only: `workers` threads take them in order (at most `workers`
    # chunks of [rows, unit_chunk] floats in memory at once), the rows are assembled in task order
    with (
        _progress(sum(u.n_units for u in unit_sets), "scoring units", progress) as bar,
        ThreadPoolExecutor(settings.workers) as pool,
    ):
        for (us, start, stop), (out, name_out, wall, cpu) in zip(
            tasks, pool.map(lambda t: score_task(*t), tasks), strict=True
        ):
            rows += _rows(us, start, out, scorer, name_out, name_scorer, settings)
            bar.update(stop - start)
            if timings is not None:  # per task, summed: with several workers, more than the elapsed time
                spent = timings.setdefault(f"{us.kind} {us.hook}", [0.0, 0.0])
                spent[0] += wall
                spent[1] += cpu
    return rows


def _rows(us: UnitSet, start: int, out: dict, scorer: Scorer, name_out, name_scorer, settings) -> list[dict]:
    def num(x) -> float | None:
        x = float(x)
        return None if math.isnan(x) else round(x, 6)

    rows = []
    for i in range(len(out["mono1"])):
        c = int(out["concept"][i])
        n_active, density = int(out["n_active"][i]), float(out["density"][i])
        flags = "dead" if n_active < settings.dead_below else "dense" if density > settings.dense_above else ""
        union = [scorer.ids[int(k)] for k in out["union"][i] if int(k) >= 0]
        row = {
            "kind": us.kind,
            "hook": us.hook,
            "index": start + i,
            "unit": us.names(start + i),
            "concept": scorer.ids[c] if c >= 0 else None,
            "family": scorer.families[c] if c >= 0 else None,
            "theta": num(out["theta"][i]),
            "mono1": num(out["mono1"][i]),
            "f1_a": num(out["f1_a"][i]),
            "mono2": num(out["mono2"][i]),
            "union": " | ".join(union) if union else None,
            "theta_union": num(out["theta_union"][i]),
            "mass_share": num(out["mass_share"][i]),
            "lift": num(out["lift"][i]),
            "r": num(out["r"][i]),
            "n_active": n_active,
            "density": round(density, 6),
            "flags": flags,
            "name_concept": None,
            "name_theta": None,
            "name_mono1": None,
        }
        if name_out is not None:
            nc = int(name_out["concept"][i])
            row["name_concept"] = name_scorer.ids[nc] if nc >= 0 else None
            row["name_theta"] = num(name_out["theta"][i])
            row["name_mono1"] = num(name_out["mono1"][i])
        rows.append(row)
    return rows


# --- summaries ------------------------------------------------------------------------------------------------------
def _quartiles(values: list[float]) -> tuple[float, float, float] | None:
    if not values:
        return None
    q = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return tuple(float(v) for v in q)


STATS = ("mono1", "mono2", "r", "mass_share", "lift", "density", "name_mono1")


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per (kind, hook): counts, flags, and the quartiles (q1, median, q3) of each score over the unflagged units
    (keys mono1, mono2, r, mass_share, lift, density, name_mono1, mono1_ge_0.5) and over every unit but the dead
    ones, dense included
    (the same keys + "_all"); units never active on half A have no scores and count in neither."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["hook"]), []).append(r)
    order = {k: i for i, k in enumerate((*MAIN_KINDS, *CONTROL_KINDS))}
    out = []
    for (kind, hook), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])):
        scored = [r for r in rs if not r["flags"] and r["mono1"] is not None]
        live = [r for r in rs if r["flags"] != "dead" and r["mono1"] is not None]
        entry = {
            "kind": kind,
            "hook": hook,
            "control": kind in CONTROL_KINDS,
            "units": len(rs),
            "dead": sum(r["flags"] == "dead" for r in rs),
            "dense": sum(r["flags"] == "dense" for r in rs),
            "scored": len(scored),
            "scored_all": len(live),
            "density_median": _quartiles([r["density"] for r in live])[1] if live else None,
        }
        for suffix, units in (("", scored), ("_all", live)):
            for key in STATS:
                entry[key + suffix] = _quartiles([r[key] for r in units if r[key] is not None])
            entry["mono1_ge_0.5" + suffix] = sum(r["mono1"] >= 0.5 for r in units) / len(units) if units else None
        out.append(entry)
    return out


def format_summary(summary: Sequence[dict]) -> str:
    """Two tables: the unflagged units (what the issue's summaries count), then every unit but the dead ones."""
    from training.cli import format_table

    def q(v) -> str:
        return "-" if v is None else f"{v[1]:.2f} [{v[0]:.2f}-{v[2]:.2f}]"

    out = []
    for suffix, title in (("", "unflagged units (dead and dense left out)"), ("_all", "all units but dead ones")):
        table = [
            {
                "kind": ("(control) " if s["control"] else "") + s["kind"],
                "hook": s["hook"],
                "units": s["units"],
                "dead": s["dead"],
                "dense": s["dense"],
                "n": s["scored" + suffix],
                "Mono1": q(s["mono1" + suffix]),
                "Mono2": q(s["mono2" + suffix]),
                "r": q(s["r" + suffix]),
                "mass share": q(s["mass_share" + suffix]),
                "density": "-" if s.get("density" + suffix) is None else f"{s['density' + suffix][1]:.4f}",
                "region Mono1": q(s.get("name_mono1" + suffix)),
                "Mono1>=.5": "-" if s["mono1_ge_0.5" + suffix] is None else f"{s['mono1_ge_0.5' + suffix]:.0%}",
            }
            for s in summary
        ]
        cols = ["kind", "hook", "units", "dead", "dense", "n", "Mono1", "Mono2", "r", "mass share", "Mono1>=.5"]
        cols += ["density", "region Mono1"]
        out.append(
            f"{title}: median [q1-q3] over the n units (density: median share of positions where the unit is > 0; "
            "region Mono1: Mono1 of the unit averaged over each name, against the name's region)\n"
            + format_table(table, cols)
        )
    return "\n\n".join(out)


# --- activations of a model at the bank's rows ----------------------------------------------------------------------
@torch.no_grad()
def collect(
    model: HookedTransformer, names: Sequence[str], hooks: Sequence[str], batch_size: int = 1024, progress: bool = False
) -> dict[str, Float[Tensor, "pos d"]]:
    """Each hook's activations at every character position of `names`, in corpus order (name 0's characters, then
    name 1's, …: the rows of `interp.concepts.build_bank(names)`), streamed by the activation store's `Collector`
    (one forward pass per batch of names, the same positions as everywhere else)."""
    from tqdm.auto import tqdm

    from interp.activations import Collector, direction_units

    sets = [direction_units(model, h) for h in dict.fromkeys(hooks)]  # the raw vectors of each hook
    collector = Collector(model, sets, list(names), batch_size=batch_size, neurons=False)
    lengths = torch.tensor([len(n) for n in names])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    out = {s.hook: torch.empty(int(lengths.sum()), s.width) for s in sets}
    for batch in tqdm(collector, desc="activations", disable=not progress, leave=False):
        dest = offsets[batch.names[batch.row_name]] + batch.pos - 1  # token position 0 is <bos>
        for s in sets:
            out[s.hook][dest] = batch.acts[s.id]
    return out


def sae_units(kind: str, sae: SAE, x: Float[Tensor, "row d_in"], chunk: int = 16384, fast: bool = True) -> UnitSet:
    """An SAE's latents on activations x, kept sparse (latents are zero almost everywhere). A plain SAELens TopK SAE
    (no hooks on its latents, no rescaling by decoder norms) gives its k largest pre-activations directly (`fast`):
    the same entries as `sae.encode`, without building and searching the dense [rows, d_sae] matrix."""
    rows, cols, vals = [], [], []
    k = _plain_topk(sae) if fast else None
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            xs = x[s : s + chunk].to(sae.W_enc.dtype)
            if k is not None:  # TopKSAE.encode up to its TopK activation, which scatters these into zeros
                pre = sae.hook_sae_acts_pre(sae.process_sae_in(xs) @ sae.W_enc + sae.b_enc)
                v, c = pre.topk(k, dim=-1, sorted=False)
                v = v.relu().float()
                keep = v != 0
                r = torch.arange(len(xs)).unsqueeze(1).expand_as(c)[keep]
                c, v = c[keep], v[keep]
            else:
                f = sae.encode(xs).float()
                if f.is_sparse:
                    f = f.to_dense()
                r, c = (f != 0).nonzero(as_tuple=True)
                v = f[r, c]
            rows.append(r + s)
            cols.append(c)
            vals.append(v)
    hook = sae.cfg.metadata.hook_name or ""
    return UnitSet.sparse(kind, hook, torch.cat(rows), torch.cat(cols), torch.cat(vals), x.shape[0], sae.cfg.d_sae)


def _plain_topk(sae: SAE) -> int | None:
    """k when `sae.encode` is exactly pre-activation → TopK (values relu'd) → latents, else None."""
    try:
        from sae_lens.saes.topk_sae import TopK, TopKSAE
    except ImportError:  # another SAELens layout: the generic path
        return None
    act = getattr(sae, "activation_fn", None)
    if type(sae) is not TopKSAE or type(act) is not TopK or getattr(act, "use_sparse_activations", False):
        return None
    if sae.cfg.rescale_acts_by_decoder_norm or not isinstance(act.k, int):
        return None
    if any(h._forward_hooks or h._forward_pre_hooks for h in (sae.hook_sae_acts_pre, sae.hook_sae_acts_post)):
        return None
    return act.k


def topk_units(kind: str, hook: str, acts: Float[Tensor, "row unit"], k: int) -> UnitSet:
    """The units with all but the k largest zeroed at every row (values <= 0 count as inactive anyway)."""
    k = min(k, acts.shape[1])
    vals, cols = acts.topk(k, dim=1)
    rows = torch.arange(acts.shape[0]).unsqueeze(1).expand_as(cols)
    keep = vals > 0
    return UnitSet.sparse(kind, hook, rows[keep], cols[keep], vals[keep], acts.shape[0], acts.shape[1])


def basis_units(kind: str, hook: str, x: Float[Tensor, "row d"]) -> UnitSet:
    """+e_i for i < d, -e_(i-d) after: both signs of every basis direction."""
    d = x.shape[1]

    def chunk(s: int, e: int) -> Tensor:
        idx = torch.arange(s, e)
        sign = torch.where(idx < d, 1.0, -1.0)
        return x[:, idx % d] * sign

    return UnitSet(kind, hook, 2 * d, chunk, lambda i: f"+{i}" if i < d else f"-{i - d}")


def random_directions(d: int, n: int, seed: int) -> Float[Tensor, "d unit"]:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(d, n, generator=gen)
    return v / v.norm(dim=0, keepdim=True)


def mlp_hooks(model: HookedTransformer) -> list[str]:
    return [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers) if not model.cfg.attn_only]


def _sae_k(sae: SAE, entries: int, rows: int) -> int:
    k = getattr(sae.cfg, "k", None)
    return int(round(k)) if k else max(1, int(round(entries / max(rows, 1))))


# --- the SAE control: same settings, same hook, the model at its random initialisation ------------------------------
def random_model(model: HookedTransformer) -> HookedTransformer:
    """The same architecture, freshly initialised with the config's seed (for a villes checkpoint, the very
    initialisation its training started from); the tokenizer is shared."""
    import copy
    import warnings

    from transformer_lens import HookedTransformer

    cfg = copy.deepcopy(model.cfg)
    with torch.random.fork_rng(), warnings.catch_warnings():  # the caller's random state is left as it was
        torch.manual_seed(cfg.seed if cfg.seed is not None else 0)
        warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
        fresh = HookedTransformer(cfg, tokenizer=model.tokenizer, move_to_device=False)
    fresh.eval()
    return fresh


def control_settings(sae: SAE, tokens: int | None = None):
    """The SAESettings the SAE was trained with (recorded by training.sae), else the closest ones its config gives."""
    from dataclasses import fields, replace

    from training.sae import SAESettings

    recorded = sae.cfg.metadata.get("villes_settings") if hasattr(sae.cfg.metadata, "get") else None
    if isinstance(recorded, dict):
        known = {f.name for f in fields(SAESettings)}
        settings = SAESettings(**{k: v for k, v in recorded.items() if k in known})
    else:
        arch = sae.cfg.architecture()
        arch = arch if arch in ("standard", "topk", "jumprelu") else "topk"
        k = getattr(sae.cfg, "k", None)
        settings = SAESettings(arch=arch, d_sae=sae.cfg.d_sae, k=float(k) if k and arch != "standard" else None)
    settings = replace(settings, hook=sae.cfg.metadata.hook_name, d_sae=sae.cfg.d_sae)
    return replace(settings, tokens=tokens) if tokens else settings


SHAPE_KEYS = (
    "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn", "normalization_type",
    "positional_embedding_type", "gated_mlp", "seed",
)  # fmt: skip


def _control_key(model: HookedTransformer, settings) -> dict:
    from dataclasses import asdict

    cfg = model.cfg.to_dict() if hasattr(model.cfg, "to_dict") else dict(vars(model.cfg))
    shape = {k: cfg.get(k) for k in SHAPE_KEYS}
    return {"model_shape": shape, "sae_settings": asdict(settings)}


def load_or_train_control_sae(
    model: HookedTransformer,
    sae: SAE,
    train_names: Sequence[str],
    folder: Path | str,
    tokens: int | None = None,
    progress: bool = False,
    reuse_any: bool = False,
) -> tuple[SAE, bool]:
    """The control SAE in `folder` if it was trained for this model shape and these settings (any SAE there, with
    `reuse_any`), else train it there (atomically). Returns (sae, trained_now)."""
    import json
    import shutil
    import tempfile

    from training.sae import collect_activations, load_sae, train_sae
    from training.tokenizer import replace_dir

    folder = Path(folder)
    settings = control_settings(sae, tokens)
    key = _control_key(model, settings)
    fresh = random_model(model)
    if folder.exists():
        try:
            recorded = json.loads((folder / "cfg.json").read_text(encoding="utf-8"))["metadata"].get("villes_control")
        except (OSError, ValueError, KeyError, AttributeError):
            recorded = None
        if recorded == json.loads(json.dumps(key)):
            return load_sae(folder, fresh), False
        if reuse_any:  # a folder the user named: used as it is, unless it says it was trained another way
            if recorded is not None:
                raise VillesError(
                    f"the control SAE in {folder} was trained for another model shape or other SAE settings than "
                    f"{settings.arch} d_sae {settings.d_sae} k {settings.k} on {settings.hook}: remove it to retrain"
                )
            return load_sae(folder, fresh), False
    acts = collect_activations(fresh, list(train_names), settings.hook)
    metadata = {
        "model_name": "villes/random-init",
        "hook_name": settings.hook,
        "context_size": model.cfg.n_ctx,
        "prepend_bos": True,
        "villes_positions": "characters (not <bos>, <eos> or padding): training.sae.sae_positions",
        "villes_control": key,
    }
    trained, _ = train_sae(acts, settings, metadata, progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        trained.save_inference_model(tmp)
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_sae(folder, fresh), True


# --- everything for one model (+ SAE) -------------------------------------------------------------------------------
@dataclass
class Report:
    rows: list[dict]
    summary: list[dict]
    bank: dict  # concepts (id, family, level, count) and aliases
    info: dict  # model, SAE, settings, timings


def monosemanticity(
    model: HookedTransformer,
    sae: SAE | None,
    names: Sequence[str],
    regions: Sequence[str] | None = None,
    *,
    control_sae: SAE | None = None,
    settings: MonoSettings = MonoSettings(),
    bank_settings=None,
    controls: bool = True,
    progress: bool = False,
) -> Report:
    """Score the SAE's features, every MLP neuron and the basis of the SAE's hook (± each direction) against the
    concept bank of `names`, with the controls (random directions, top-k neurons, `control_sae`'s features when
    given). Without an SAE, the basis and random directions are taken at the last residual stream."""

    from interp.concepts import BankSettings, build_bank
    from training.sae import check_sae_fits, default_hook

    settings.validate()
    wall, cpu = {}, {}

    def clock(key: str, since: tuple[float, float]) -> tuple[float, float]:
        now = (time.perf_counter(), time.process_time())
        wall[key], cpu[key] = now[0] - since[0], now[1] - since[1]
        return now

    t = (time.perf_counter(), time.process_time())
    bank = build_bank(names, regions, bank_settings or BankSettings())
    scorer = Scorer(bank.labels, bank.name_ids, settings)
    t = clock("bank", t)
    hook = sae.cfg.metadata.hook_name if sae is not None else default_hook(model)
    if sae is not None:
        check_sae_fits(model, sae, hook)
    if controls and control_sae is not None:
        if sae is not None and control_sae.cfg.d_in != sae.cfg.d_in:
            raise VillesError("the control SAE's d_in differs from the SAE's")
    neuron_hooks = mlp_hooks(model)
    acts = collect(model, names, [hook, *neuron_hooks], progress=progress)
    acts = {h: a.index_select(0, scorer.order) for h, a in acts.items()}  # half A's rows, then half B's
    t = clock("activations", t)
    control_x = None
    if controls and control_sae is not None:
        control_hook = control_sae.cfg.metadata.hook_name or hook
        control_x = collect(random_model(model), names, [control_hook], progress=progress)[control_hook]
        control_x = control_x.index_select(0, scorer.order)
        t = clock("control activations", t)

    units: list[UnitSet] = []
    x = acts[hook]
    l0 = None
    if sae is not None:
        feats = sae_units("feature", sae, x)
        units.append(feats)
        l0 = feats.n_entries / x.shape[0]
    for h in neuron_hooks:
        units.append(UnitSet.dense("neuron", h, acts[h]))
    units.append(basis_units("residual" if "resid" in hook else "basis", hook, x))
    t = clock("units", t)
    if controls:
        n_random = settings.n_random if settings.n_random is not None else 2 * x.shape[1]
        if n_random:
            directions = random_directions(x.shape[1], n_random, settings.seed)
            units.append(UnitSet.projection("random_direction", hook, x, directions))
        k = settings.topk or (_sae_k(sae, feats.n_entries, x.shape[0]) if sae is not None else 8)
        for h in neuron_hooks:
            units.append(topk_units("neuron_topk", h, acts[h], k))
        if control_x is not None:
            units.append(sae_units("random_model_feature", control_sae, control_x))
        t = clock("control units", t)
    for us in units:
        us.ordered = True
    by_kind: dict[str, list[float]] = {}
    rows = score(
        units, bank.labels, bank.name_ids, name_labels=bank.name_labels, settings=settings, scorer=scorer,
        progress=progress, timings=by_kind,
    )  # fmt: skip
    clock("scoring", t)
    info = {
        "names": len(names),
        "positions": bank.n_positions,
        "concepts": bank.labels.n_concepts,
        "name_concepts": bank.name_labels.n_concepts,
        "hook": hook,
        "sae_l0": l0,
        "sae_fingerprint": sae_fingerprint(sae) if sae is not None else None,
        "settings": _asdict(settings),
        "bank_settings": _asdict(bank.settings),
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "scoring_by_kind": {k: {"wall_s": round(v[0], 2), "cpu_s": round(v[1], 2)} for k, v in by_kind.items()},
        "torch_threads": torch.get_num_threads(),
    }
    concepts = {"concepts": bank.describe(), "aliases": bank.aliases}
    return Report(rows, summarize(rows), concepts, info)


def _asdict(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


# --- figures and files ----------------------------------------------------------------------------------------------
def _kind_label(row: dict) -> str:
    layer = row["hook"].split(".")[1] if row["hook"].startswith("blocks.") else ""
    tag = f" L{layer}" if row["kind"] in ("neuron", "neuron_topk") and layer else ""
    return ("(control) " if row["kind"] in CONTROL_KINDS else "") + row["kind"] + tag


def figures(rows: Sequence[dict]) -> dict:
    """Plotly figures: Mono1 and Mono2 distributions by kind (unflagged units), and Mono1 against activation density
    (every unit that is not dead: dense ones too, so the frequency confound is visible)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kinds = list(dict.fromkeys(_kind_label(r) for r in rows))
    dist = make_subplots(
        rows=3,
        cols=2,
        vertical_spacing=0.1,
        subplot_titles=(
            "Mono1, unflagged units",
            "Mono2, unflagged units",
            "Mono1, all units but dead ones (dense included)",
            "Mono2, all units but dead ones (dense included)",
            "r (point-biserial, c*), all units but dead ones",
            "share of the activation mass on c*, all units but dead ones",
        ),
    )
    shown: set[str] = set()
    for i, kind in enumerate(kinds):
        live = [r for r in rows if _kind_label(r) == kind and r["flags"] != "dead" and r["mono1"] is not None]
        panels = [(1, 1, "mono1", False), (1, 2, "mono2", False), (2, 1, "mono1", True), (2, 2, "mono2", True)]
        panels += [(3, 1, "r", True), (3, 2, "mass_share", True)]
        for row, col, key, dense in panels:
            values = [r[key] for r in live if r[key] is not None and (dense or not r["flags"])]
            if not values:
                continue
            dist.add_trace(
                go.Box(
                    y=values,
                    x=[kind] * len(values),
                    name=kind,
                    legendgroup=kind,
                    showlegend=kind not in shown,
                    marker_color=_COLORS[i % len(_COLORS)],
                    boxpoints=False,
                ),
                row=row,
                col=col,
            )
            shown.add(kind)
    dist.update_xaxes(showticklabels=False)
    dist.update_layout(
        title="Monosemanticity by unit kind (Mono1: held-out best-concept F1; Mono2: F1(c1) / F1(c1 ∨ c2 ∨ c3))",
        height=1250,
    )
    dens = go.Figure()
    for i, kind in enumerate(kinds):
        live = [r for r in rows if _kind_label(r) == kind and r["flags"] != "dead" and r["mono1"] is not None]
        dens.add_trace(
            go.Scattergl(
                x=[r["density"] for r in live],
                y=[r["mono1"] for r in live],
                mode="markers",
                name=kind,
                marker={"size": 4, "opacity": 0.55, "color": _COLORS[i % len(_COLORS)]},
                text=[f"{r['unit']} {r['hook']}: {r['concept']} (θ {r['theta']})" for r in live],
                hoverinfo="text+x+y",
            )
        )
    dens.add_vline(x=0.1, line_dash="dot", annotation_text="dense (10%)")
    dens.update_layout(
        title="Mono1 against activation density (share of positions where the unit is > 0)",
        xaxis={"type": "log", "title": "activation density"},
        yaxis={"title": "Mono1 (held-out F1)"},
        height=520,
    )
    return {"distributions": dist, "density": dens}


_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
FORMAT = "villes-monosemanticity-1"
CONTROL_DIR = "control_sae"


def _csv(rows: Sequence[dict], fields: Sequence[str]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in fields})
    return buf.getvalue()


def write_report(report: Report, folder: Path | str, figs: bool = True) -> None:
    """units.csv / units.json (one row per unit), summary.json, summary.txt, concepts.json, figures.html, written
    into `folder` (which may already hold a control_sae/ folder; nothing else is touched)."""
    import json

    import plotly.io as pio

    from training import checkpoint as ckpt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(folder / "units.csv", _csv(report.rows, ROW_FIELDS))
    ckpt.atomic_write_text(folder / "units.json", json.dumps(report.rows, ensure_ascii=False) + "\n")
    ckpt.atomic_write_json(folder / "summary.json", {"format": FORMAT, "summary": report.summary, **report.info})
    ckpt.atomic_write_text(folder / "summary.txt", format_summary(report.summary) + "\n")
    ckpt.atomic_write_json(folder / "concepts.json", report.bank)
    if figs:
        parts = []
        for i, (name, fig) in enumerate(figures(report.rows).items()):
            parts.append(f"<h2>{name}</h2>" + pio.to_html(fig, full_html=False, include_plotlyjs=i == 0))
        html = "<!doctype html><html><head><meta charset='utf-8'><title>villes monosemanticity</title></head><body>"
        ckpt.atomic_write_text(folder / "figures.html", html + "\n".join(parts) + "</body></html>\n")


def read_rows(folder: Path | str) -> list[dict]:
    """The per-unit rows of a monosemanticity folder (for the dashboards' label slot, the steering's feature picks)."""
    return _read_source(folder)[0]


def _read_source(source) -> tuple[list[dict], dict]:
    """(rows, info) of a Report, of a list of rows (no info), or of a monosemanticity folder (or its units.json)."""
    import json

    if isinstance(source, Report):
        return source.rows, source.info
    if isinstance(source, str | Path):
        path = Path(source)
        folder = path.parent if path.name == "units.json" else path
        units = folder / "units.json"
        try:
            rows = json.loads(units.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VillesError(f"{path} is not a monosemanticity folder (no units.json)") from None
        except (OSError, ValueError) as e:
            raise VillesError(f"cannot read monosemanticity rows {units}: {str(e).splitlines()[0]}") from None
        try:
            info = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        source = rows
    else:
        info = {}
    if not isinstance(source, Sequence) or not all(isinstance(r, dict) for r in source):
        raise VillesError("monosemanticity rows must be a list of per-unit rows (units.json)")
    for r in source:
        if not {"kind", "hook", "index", "concept", "mono1"} <= r.keys():
            raise VillesError("monosemanticity rows lack kind, hook, index, concept or mono1: not a units.json")
    return list(source), info if isinstance(info, dict) else {}


def unit_labels(source, kind: str | None = None) -> dict[tuple[str, str, int], tuple[str, float]]:
    """Each scored unit's label: (kind, hook, index) -> (best concept c*, Mono1), e.g. ("feature",
    "blocks.1.hook_resid_post", 17) -> ("word=saint", 0.93); `kind` keeps one kind only. `source`: a `Report`, its
    rows, or a monosemanticity folder (or its units.json). Units without a score (never active on half A) have no
    label; flagged (dead, dense) units keep theirs (the rows say which they are)."""
    rows, _ = _read_source(source)
    return {
        (str(r["kind"]), str(r["hook"]), int(r["index"])): (str(r["concept"]), float(r["mono1"]))
        for r in rows
        if r["concept"] is not None and r["mono1"] is not None and (kind is None or r["kind"] == kind)
    }


def sae_fingerprint(sae: SAE) -> str:
    """A short digest of an SAE's weights (encoder and decoder), recorded in summary.json so that labels are never
    shown on another SAE's features."""
    import hashlib

    digest = hashlib.sha256()
    for t in (sae.W_enc, sae.b_enc, sae.W_dec):
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def sae_labels(source, sae: SAE, hook: str | None = None) -> dict[int, tuple[str, float]]:
    """The labels of one SAE's features: index -> (best concept, Mono1), from a report scored on this very SAE (same
    hook, as many features, and the same weights when the report records them); otherwise VillesError."""
    rows, info = _read_source(source)
    hook = hook or sae.cfg.metadata.hook_name or ""
    feats = [r for r in rows if r["kind"] == "feature" and r["hook"] == hook]
    if not feats:
        hooks = sorted({r["hook"] for r in rows if r["kind"] == "feature"})
        raise VillesError(
            f"the monosemanticity report has no SAE features on {hook}"
            + (f" (it scored features on {', '.join(hooks)})" if hooks else " (it was run without an SAE)")
        )
    if len(feats) != sae.cfg.d_sae or max(int(r["index"]) for r in feats) != sae.cfg.d_sae - 1:
        raise VillesError(
            f"the monosemanticity report scored {len(feats)} features on {hook}, this SAE has {sae.cfg.d_sae}: "
            "it was made for another SAE"
        )
    recorded = info.get("sae_fingerprint")
    if recorded and recorded != sae_fingerprint(sae):
        raise VillesError(f"the monosemanticity report was made for another SAE on {hook} (other weights)")
    return {index: label for (_, _, index), label in unit_labels(feats).items()}


def units_for(rows: Sequence[dict], concept: str, kind: str = "feature", level: str = "position") -> list[dict]:
    """The unflagged units of `kind` whose best concept is `concept` (e.g. "word=saint"; at level "name", a region such
    as "region=Bretagne"), best Mono1 first: how steering picks the features of a concept."""
    key, score_key = ("concept", "mono1") if level == "position" else ("name_concept", "name_mono1")
    if level not in ("position", "name"):
        raise VillesError(f"level must be position or name, got {level!r}")
    hits = [r for r in rows if r["kind"] == kind and not r["flags"] and r[key] == concept and r[score_key] is not None]
    return sorted(hits, key=lambda r: (-r[score_key], r["index"]))


def check_out(out: Path) -> None:
    """--out may be new, empty, or an earlier monosemanticity folder (replaced whole); never a file or other data."""
    from training.checkpoint import check_replaceable_out

    check_replaceable_out(out, "summary.json", FORMAT, "monosemanticity")


# --- command line ---------------------------------------------------------------------------------------------------
def cmd_monosemanticity(args) -> int:
    import json
    import shutil
    import tempfile

    from training.checkpoint import read_json
    from training.data import load_corpus
    from training.sae import REPO_ROOT, load_sae
    from training.tokenizer import replace_dir
    from training.transformer import load_model

    out: Path = args.out
    checkpoint = args.checkpoint or REPO_ROOT / "checkpoints" / "transformer"
    sae_dir = None if args.no_sae else (args.sae or REPO_ROOT / "checkpoints" / "sae")
    settings = MonoSettings(split_seed=args.seed, seed=args.seed)
    settings.validate()
    if args.control_tokens is not None and args.control_tokens <= 0:
        raise VillesError(f"--control-tokens must be positive, got {args.control_tokens}")
    check_out(out)
    for other in (checkpoint, sae_dir, args.control_sae):
        if other is not None and out.resolve() == Path(other).resolve():
            raise VillesError(f"--out {out} is also an input folder: choose another")
    model = load_model(checkpoint)
    sae = None
    if sae_dir is not None:
        if not Path(sae_dir).exists() and args.sae is None:
            raise VillesError(f"no SAE at {sae_dir}: pass --sae DIR, or --no-sae for neurons and directions only")
        sae = load_sae(sae_dir, checkpoint)
    info = read_json(Path(checkpoint) / "config.json").get("corpus", {})
    corpus = load_corpus(info.get("names_file"), lowercase=info.get("lowercase", True))
    communes = corpus.split("all")
    names, regions = [c.name for c in communes], [c.region for c in communes]
    from training.sae import char_tokenizer

    tok = char_tokenizer(model)
    for name in names:  # fail before any work on a character the model lacks
        tok.encode(name)
    progress = not args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        control, trained = None, False
        controls = not args.no_controls
        if controls and sae is not None:
            if args.control_sae is not None:
                folder = Path(args.control_sae)
            else:  # kept with the results and reused by the next run into the same --out
                folder = tmp / CONTROL_DIR
                if (out / CONTROL_DIR).is_dir():
                    shutil.copytree(out / CONTROL_DIR, folder)
            if progress:
                print(f"control SAE (random-init model, same settings): {folder}", file=sys.stderr)
            control, trained = load_or_train_control_sae(
                model, sae, corpus.split_names("train"), folder, args.control_tokens, progress,
                reuse_any=args.control_sae is not None,
            )  # fmt: skip
        report = monosemanticity(model, sae, names, regions, control_sae=control, settings=settings,
                                 controls=controls, progress=progress)  # fmt: skip
        report.info.update(
            checkpoint=str(checkpoint), sae=str(sae_dir) if sae is not None else None,
            control_sae=str(args.control_sae or out / CONTROL_DIR) if control is not None else None,
            control_sae_trained_now=trained if control is not None else None,
        )  # fmt: skip
        write_report(report, tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"summary": report.summary, **report.info}, ensure_ascii=False))
        return 0
    print(format_summary(report.summary))
    t = report.info["wall_s"]
    print(f"{len(report.rows)} units, {report.info['concepts']} concepts, {report.info['positions']} positions; "
          f"{sum(t.values()):.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in t.items())}); written to {out}")  # fmt: skip
    return 0


def add_monosemanticity_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "monosemanticity", help="score every neuron, SAE feature and direction against the automatic concept bank"
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="transformer checkpoint (default checkpoints/transformer)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sae", type=Path, default=None, help="SAELens SAE folder (default checkpoints/sae)")
    g.add_argument("--no-sae", action="store_true", help="neurons and basis directions only")
    p.add_argument("--out", type=Path, required=True, help="output folder (new, empty, or an earlier one: replaced)")
    p.add_argument("--control-sae", type=Path, default=None,
                   help="the random-init SAE control: loaded from this folder, trained into it if absent "
                        "(default: OUT/control_sae, reused across runs)")  # fmt: skip
    p.add_argument("--control-tokens", type=int, default=None,
                   help="train the control SAE on this many tokens instead of the SAE's own number")  # fmt: skip
    p.add_argument("--no-controls", action="store_true", help="skip random directions, top-k neurons, control SAE")
    p.add_argument("--seed", type=int, default=0, help="the A/B split of the names and the random directions")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (and no progress bars)")
    p.set_defaults(func=cmd_monosemanticity)
