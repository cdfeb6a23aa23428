"""Regions: a classifier that tells which region a commune name sounds like, and steering toward a region.

The classifier is the measuring stick of region steering: a multinomial logistic regression over the character
n-grams (1 to 5, with ^ and $ marking the ends) of the name, trained on the train split with region metadata, its L2
strength chosen on the val split and its recall reported on the test split. It is a plain linear model on counts, so
it reads the same cues a person would ("plou", "ker", "-ec$" for Bretagne; "-court$", "-heim$", "-viller$" for Grand
Est) and is fast enough to score tens of thousands of generated names in a second.

Steering methods (each returns `(hook_name, fn)` pairs from `interp.steering`):
- difference of means at a hook: d = mean activation over the region's names − mean over all names (character
  positions and <bos>); added as alpha × d, or clamped (the coordinate along d set to the region's mean, × alpha);
- linear probe: a one-vs-rest logistic probe on the same activations; its weight vector, rescaled to the length of
  the difference of means so that strengths compare;
- SAE features most associated with the region: the features with the highest lift (mean activation on the region's
  names / mean on all names), clamped to alpha × their mean activation where the region's names fire them, or added.
  (The concept bank of the monosemanticity work will supply region labels per feature; `region_features` is the
  small stand-in computed here from activations.)
Each at every position or only the first few (`Where(first=k)`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from training.errors import VillesError

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from interp.steering import Hook, Where
    from training.data import Corpus
    from training.tokenizer import CharTokenizer


def regions_of(corpus: Corpus) -> list[str]:
    return sorted({c.region for c in corpus.communes if c.region})


def check_region(corpus: Corpus, region: str) -> str:
    known = regions_of(corpus)
    if region not in known:
        close = [r for r in known if r.lower().startswith(region.lower()[:3])] if region else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise VillesError(f"unknown region {region!r}{hint}: choose one of {', '.join(known)}")
    return region


# --- the classifier ---------------------------------------------------------------------------------------------------
def char_ngrams(name: str, orders: Sequence[int] = (1, 2, 3, 4, 5)) -> list[str]:
    s = f"^{name}$"
    return [s[i : i + n] for n in orders for i in range(len(s) - n + 1)]


@dataclass(frozen=True)
class ClassifierSettings:
    orders: tuple[int, ...] = (1, 2, 3, 4, 5)
    min_count: int = 2  # n-grams in fewer train names are dropped
    weight_decay: float = 3e-5  # L2 on the n-gram weights (summed squares)
    steps: int = 80  # full-batch Adam steps at most; the step with the best val log-loss is kept
    eval_every: int = 10
    lr: float = 0.1
    seed: int = 0


class RegionClassifier:
    """Multinomial logistic regression over character n-gram counts: logits = counts @ weight + bias."""

    def __init__(self, vocab: dict[str, int], regions: list[str], weight: Tensor, bias: Tensor, orders):
        self.vocab, self.regions, self.orders = vocab, list(regions), tuple(orders)
        self.weight, self.bias = weight, bias  # [n_grams, regions], [regions]
        self.index = {r: i for i, r in enumerate(self.regions)}

    def features(self, names: Sequence[str]) -> Tensor:
        """Sparse [names, n_grams] counts (a sparse product keeps training and scoring fast on a CPU)."""
        rows, cols = [], []
        for i, name in enumerate(names):
            ids = [self.vocab[g] for g in char_ngrams(name, self.orders) if g in self.vocab]
            rows += [i] * len(ids)
            cols += ids
        x = torch.sparse_coo_tensor(
            torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
            torch.ones(len(rows)),
            (len(names), len(self.vocab)),
        )
        return x.coalesce()

    @torch.no_grad()
    def logits(self, names: Sequence[str]) -> Float[Tensor, "names regions"]:
        if not names:
            return torch.zeros(0, len(self.regions))
        return torch.sparse.mm(self.features(names), self.weight) + self.bias

    def predict(self, names: Sequence[str]) -> list[str]:
        return [self.regions[i] for i in self.logits(names).argmax(-1).tolist()]

    def is_region(self, names: Sequence[str], region: str) -> list[bool]:
        return (self.logits(names).argmax(-1) == self.index[region]).tolist()

    def share(self, names: Sequence[str], region: str) -> float:
        """Share of names assigned to `region`: the success rate of steering toward it."""
        return sum(self.is_region(names, region)) / len(names) if names else 0.0

    # safetensors + JSON metadata: nothing pickled
    def save(self, path: Path | str) -> None:
        from training.checkpoint import atomic_save_tensors

        meta = {"regions": json.dumps(self.regions, ensure_ascii=False), "orders": json.dumps(self.orders)}
        meta["vocab"] = json.dumps(sorted(self.vocab, key=self.vocab.get), ensure_ascii=False)
        atomic_save_tensors({"weight": self.weight, "bias": self.bias}, path, metadata=meta)

    @classmethod
    def load(cls, path: Path | str) -> RegionClassifier:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        except (OSError, ValueError) as e:
            raise VillesError(f"cannot read region classifier {path}: {e}") from None
        vocab = {g: i for i, g in enumerate(json.loads(meta["vocab"]))}
        return cls(vocab, json.loads(meta["regions"]), weight, bias, json.loads(meta["orders"]))


def train_region_classifier(
    corpus: Corpus, settings: ClassifierSettings = ClassifierSettings(), progress: bool = False
) -> tuple[RegionClassifier, dict]:
    """Fit on the train split (full-batch Adam, cosine schedule), keep the step with the best val log-loss."""
    s = settings
    train = [c for c in corpus.split("train") if c.region]
    val = [c for c in corpus.split("val") if c.region]
    if not train or not val:
        raise VillesError("the corpus has no region metadata: the region classifier needs communes.tsv")
    counts = Counter(g for c in train for g in set(char_ngrams(c.name, s.orders)))
    vocab = {g: i for i, g in enumerate(sorted(g for g, k in counts.items() if k >= s.min_count))}
    regions = sorted({c.region for c in train})
    cls_index = {r: i for i, r in enumerate(regions)}
    y = torch.tensor([cls_index[c.region] for c in train])
    prior = torch.bincount(y, minlength=len(regions)).float() / len(y)
    torch.manual_seed(s.seed)
    weight = torch.zeros(len(vocab), len(regions), requires_grad=True)
    bias = prior.log().clone().requires_grad_(True)  # zero weights + log-prior bias: the prior classifier
    clf = RegionClassifier(vocab, regions, weight, bias, s.orders)
    x = clf.features([c.name for c in train])
    val_known = [c for c in val if c.region in cls_index]
    xv, yv = clf.features([c.name for c in val_known]), torch.tensor([cls_index[c.region] for c in val_known])
    opt = torch.optim.Adam([weight, bias], lr=s.lr)
    best, log = (float("inf"), None, 0), []
    for step in range(1, s.steps + 1):
        for g in opt.param_groups:
            g["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / s.steps))
        loss = F.cross_entropy(torch.sparse.mm(x, weight) + bias, y) + s.weight_decay * (weight**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % s.eval_every == 0 or step == s.steps:
            with torch.no_grad():
                lv = torch.sparse.mm(xv, weight) + bias
                nll, acc = float(F.cross_entropy(lv, yv)), float((lv.argmax(-1) == yv).float().mean())
            log.append({"step": step, "train_loss": round(loss.item(), 4), "val_nll": round(nll, 4), "val_acc": acc})
            if progress:
                print(log[-1], flush=True)
            if nll < best[0]:
                best = (nll, (weight.detach().clone(), bias.detach().clone()), step)
    w, b = best[1]
    return RegionClassifier(vocab, regions, w, b, s.orders), {
        "history": log,
        "best_step": best[2],
        "n_grams": len(vocab),
    }


class NaiveBayes:
    """The floor: multinomial naive Bayes over 1–3-grams, add-one smoothing."""

    def __init__(self, corpus: Corpus, orders: Sequence[int] = (1, 2, 3)):
        self.orders = tuple(orders)
        train = [c for c in corpus.split("train") if c.region]
        self.regions = sorted({c.region for c in train})
        self.counts = {r: Counter() for r in self.regions}
        docs = Counter(c.region for c in train)
        for c in train:
            self.counts[c.region].update(char_ngrams(c.name, self.orders))
        self.vocab = set().union(*self.counts.values())
        self.log_prior = {r: math.log(docs[r] / len(train)) for r in self.regions}
        self.totals = {r: sum(self.counts[r].values()) + len(self.vocab) for r in self.regions}

    def predict(self, names: Sequence[str]) -> list[str]:
        out = []
        for name in names:
            grams = [g for g in char_ngrams(name, self.orders) if g in self.vocab]
            scores = {
                r: self.log_prior[r] + sum(math.log((self.counts[r][g] + 1) / self.totals[r]) for g in grams)
                for r in self.regions
            }
            out.append(max(scores, key=scores.get))
        return out


def recall_table(predict, corpus: Corpus, split: str = "test") -> dict[str, tuple[float, int]]:
    communes = [c for c in corpus.split(split) if c.region]
    pred = predict([c.name for c in communes])
    hits, total = Counter(), Counter(c.region for c in communes)
    for p, c in zip(pred, communes, strict=True):
        hits[c.region] += p == c.region
    return {r: (hits[r] / n, n) for r, n in total.most_common()}


# --- activations by region --------------------------------------------------------------------------------------------
@torch.no_grad()
def _acts_and_rows(
    model: HookedTransformer, tokenizer: CharTokenizer, names: Sequence[str], hook_name: str
) -> tuple[Float[Tensor, "n d"], Int[Tensor, " n"]]:
    """Activations at every position that predicts a letter or the end (<bos> and the characters; not <eos>, not
    padding), flattened, with the index of the name each comes from."""
    from interp.steering import activations

    tokens = tokenizer.batch(names)
    acts = activations(model, tokens, hook_name)
    keep = (tokens != 0) & (tokens != 2)
    rows = torch.arange(len(names))[:, None].expand_as(tokens)
    return acts[keep], rows[keep]


@dataclass
class RegionDirection:
    hook_name: str
    direction: Float[Tensor, " d"]
    region_mean: float  # coordinate of the region's mean activation along the direction (units of the direction)
    overall_mean: float


@torch.no_grad()
def diff_of_means(
    model: HookedTransformer, tokenizer: CharTokenizer, corpus: Corpus, region: str, hook_name: str
) -> RegionDirection:
    check_region(corpus, region)
    train = corpus.split("train")
    acts, rows = _acts_and_rows(model, tokenizer, [c.name for c in train], hook_name)
    in_region = torch.tensor([c.region == region for c in train])[rows]
    mu_r, mu = acts[in_region].mean(0), acts.mean(0)
    d = mu_r - mu
    dd = float(d @ d)
    return RegionDirection(hook_name, d, float(mu_r @ d) / dd, float(mu @ d) / dd)


@torch.no_grad()
def probe_direction(
    model: HookedTransformer,
    tokenizer: CharTokenizer,
    corpus: Corpus,
    region: str,
    hook_name: str,
    epochs: int = 8,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> RegionDirection:
    """A one-vs-rest logistic probe on the hook's activations; the returned direction has the probe's orientation and
    the difference of means' length (so that the same alpha moves activations by comparable amounts)."""
    check_region(corpus, region)
    train = corpus.split("train")
    acts, rows = _acts_and_rows(model, tokenizer, [c.name for c in train], hook_name)
    y = torch.tensor([c.region == region for c in train], dtype=torch.float)[rows]
    mu, sd = acts.mean(0), acts.std(0) + 1e-6
    z = (acts - mu) / sd
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(acts.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    pos_weight = torch.tensor((1 - y.mean()) / y.mean())  # balanced: the region is a small class
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(z), generator=gen).split(4096):
                loss = (
                    torch.nn.functional.binary_cross_entropy_with_logits(z[idx] @ w + b, y[idx], pos_weight=pos_weight)
                    + weight_decay * (w**2).sum()
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
    direction = w.detach() / sd  # the probe's weight in raw activation space
    dm = acts[y.bool()].mean(0) - mu
    direction = direction / direction.norm() * dm.norm()
    dd = float(direction @ direction)
    return RegionDirection(
        hook_name, direction, float(acts[y.bool()].mean(0) @ direction) / dd, float(mu @ direction) / dd
    )


@dataclass
class RegionFeature:
    index: int
    lift: float  # mean activation on the region's names / mean on all names
    region_active_mean: float  # mean activation where it fires on the region's names
    frequency: float  # share of positions where it fires (all names)


@torch.no_grad()
def region_features(
    model: HookedTransformer,
    tokenizer: CharTokenizer,
    corpus: Corpus,
    sae: SAE,
    region: str,
    top: int = 5,
    min_frequency: float = 1e-3,
    hook_name: str | None = None,
) -> list[RegionFeature]:
    """The SAE features most associated with a region, by lift over the train split's positions. A stand-in for the
    concept bank's region labels (plug those in here when they exist)."""
    from interp.steering import sae_hook_name

    check_region(corpus, region)
    train = corpus.split("train")
    acts, rows = _acts_and_rows(model, tokenizer, [c.name for c in train], sae_hook_name(sae, hook_name))
    in_region = torch.tensor([c.region == region for c in train])[rows]
    sums_r = torch.zeros(sae.cfg.d_sae)
    sums = torch.zeros(sae.cfg.d_sae)
    fires = torch.zeros(sae.cfg.d_sae)
    fires_r = torch.zeros(sae.cfg.d_sae)
    for idx in torch.arange(len(acts)).split(8192):
        f = sae.encode(acts[idx]).float()
        sums += f.sum(0)
        fires += (f > 0).float().sum(0)
        sums_r += f[in_region[idx]].sum(0)
        fires_r += (f[in_region[idx]] > 0).float().sum(0)
    mean, mean_r = sums / len(acts), sums_r / in_region.sum()
    freq = fires / len(acts)
    lift = (mean_r + 1e-9) / (mean + 1e-9)
    lift[freq < min_frequency] = 0
    order = lift.argsort(descending=True)[:top].tolist()
    return [RegionFeature(i, float(lift[i]), float(sums_r[i] / fires_r[i].clamp(min=1)), float(freq[i])) for i in order]


# --- steering toward a region -----------------------------------------------------------------------------------------
METHODS = ("diffmean-add", "diffmean-clamp", "probe-add", "sae-add", "sae-clamp")


def direction_steering(
    model: HookedTransformer, rd: RegionDirection, mode: str, alpha: float, where: Where | None = None
) -> list[Hook]:
    """add: x + alpha·d. clamp: x's coordinate along d set to overall + alpha × (region − overall)."""
    from interp.steering import add_direction, clamp_direction

    if mode == "add":
        return add_direction(model, rd.hook_name, rd.direction, alpha, where=where)
    target = rd.overall_mean + alpha * (rd.region_mean - rd.overall_mean)
    return clamp_direction(model, rd.hook_name, rd.direction, target, where=where)


def feature_steering(
    model: HookedTransformer,
    sae: SAE,
    features: Sequence[RegionFeature],
    mode: str,
    alpha: float,
    where: Where | None = None,
) -> list[Hook]:
    """add: alpha × each feature's mean active value added; clamp: each clamped to alpha × that value."""
    from interp.steering import Edit, feature_hooks

    op = "add" if mode == "add" else "clamp"
    return feature_hooks(model, sae, {f.index: Edit(op, alpha * f.region_active_mean) for f in features}, where=where)


DEFAULT_HOOK = "blocks.0.hook_resid_pre"
DEFAULT_ALPHA = 4.0


def region_direction_hooks(
    model: HookedTransformer,
    tokenizer: CharTokenizer,
    corpus: Corpus,
    region: str,
    hook_name: str | None = None,
    alpha: float | None = None,
    where: Where | None = None,
) -> list[Hook]:
    """The CLI's region steering: the difference of means at `hook_name`, added with strength alpha."""
    from interp.steering import check_finite, hook_shape

    check_region(corpus, region)
    hook_name = hook_name or DEFAULT_HOOK
    hook_shape(model, hook_name)
    alpha = DEFAULT_ALPHA if alpha is None else check_finite(alpha, "--alpha")
    rd = diff_of_means(model, tokenizer, corpus, region, hook_name)
    return direction_steering(model, rd, "add", alpha, where)
