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
- SAE features most associated with the region: the features whose name-level concept-bank label is the region
  (`interp.monosemanticity` rows), else those with the highest lift (mean activation on the region's names / mean on
  all names); clamped to alpha × their mean activation where the region's names fire them, or added;
- fitted vectors: one vector per early position (and one shared by the rest) at the residual stream entering each
  block, fitted by gradient descent (the model frozen) to make the region's names likely, optionally contrastively
  (more likely than other regions' names). The only method measured to reach 30% for Bretagne within 0.5 nats/char.
Each at every position or only the first few (`Where(first=k)`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
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
        self.fingerprint = ""  # of the corpus and settings it was trained on (see load_or_train_classifier)

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
            check_invariants=False,  # built right here; checking would only cost time
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
        meta["fingerprint"] = getattr(self, "fingerprint", "") or ""
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
        clf = cls(vocab, json.loads(meta["regions"]), weight, bias, json.loads(meta["orders"]))
        clf.fingerprint = meta.get("fingerprint", "")
        return clf


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


def _fingerprint(corpus: Corpus, settings: ClassifierSettings) -> str:
    import hashlib

    h = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for c in corpus.communes:
        h.update(f"{c.name}\t{c.region}\n".encode())
    return h.hexdigest()


def load_or_train_classifier(
    corpus: Corpus, cache: Path | str | None = None, settings: ClassifierSettings = ClassifierSettings()
) -> tuple[RegionClassifier, dict]:
    """The classifier from `cache` if it was trained on this corpus with these settings, else trained (and cached)."""
    fingerprint = _fingerprint(corpus, settings)
    if cache is not None and Path(cache).is_file():
        clf = RegionClassifier.load(cache)
        if getattr(clf, "fingerprint", None) == fingerprint:
            return clf, {"cached": str(cache)}
    clf, info = train_region_classifier(corpus, settings)
    clf.fingerprint = fingerprint
    if cache is not None:
        clf.save(cache)
    return clf, info


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
@dataclass
class RegionSample:
    """Activations at some hooks over a sample of train names: every name of the target region plus a uniform sample
    of all train names (the overall mean). Positions are <bos> and the characters (the ones that predict a letter or
    the end), flattened; `rows` maps each position back to its name."""

    region: str
    names: list[str]
    in_region: Bool[Tensor, " names"]
    uniform: Bool[Tensor, " names"]  # part of the uniform sample
    rows: Int[Tensor, " positions"]  # name index of each position
    positions: Int[Tensor, " positions"]  # absolute position
    acts: dict[str, Float[Tensor, "positions d"]]

    def region_mask(self) -> Tensor:
        return self.in_region[self.rows]

    def uniform_mask(self) -> Tensor:
        return self.uniform[self.rows]


@torch.no_grad()
def collect_region_sample(
    model: HookedTransformer,
    tokenizer: CharTokenizer,
    corpus: Corpus,
    region: str,
    hook_names: Sequence[str],
    *,
    n_uniform: int = 6000,
    seed: int = 0,
    batch_size: int = 512,
) -> RegionSample:
    """Activations at `hook_names` over the region's train names and a uniform sample (see RegionSample)."""
    from interp.steering import hook_shape

    check_region(corpus, region)
    for h in hook_names:
        hook_shape(model, h)
    train = corpus.split("train")
    gen = torch.Generator().manual_seed(seed)
    pick = set(torch.randperm(len(train), generator=gen)[: min(n_uniform, len(train))].tolist())
    chosen = [i for i, c in enumerate(train) if c.region == region or i in pick]
    names = [train[i].name for i in chosen]
    in_region = torch.tensor([train[i].region == region for i in chosen])
    uniform = torch.tensor([i in pick for i in chosen])
    order = sorted(range(len(names)), key=lambda i: len(names[i]))  # similar lengths together: little padding
    acts: dict[str, list[Tensor]] = {h: [] for h in hook_names}
    rows, positions = [], []
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        tokens = tokenizer.batch([names[i] for i in idx], drop_unknown=True)[:, : model.cfg.n_ctx]
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in acts)
        keep = (tokens != 0) & (tokens != 2)  # <bos> and characters
        for h in hook_names:
            acts[h].append(cache[h][keep])
        rows.append(torch.tensor(idx)[:, None].expand_as(tokens)[keep])
        positions.append(torch.arange(tokens.shape[1]).expand_as(tokens)[keep])
    return RegionSample(
        region,
        names,
        in_region,
        uniform,
        torch.cat(rows),
        torch.cat(positions),
        {h: torch.cat(v) for h, v in acts.items()},
    )


@dataclass
class RegionDirection:
    hook_name: str
    direction: Float[Tensor, " d"]
    region_mean: float  # coordinate of the region's mean activation along the direction (units of the direction)
    overall_mean: float


def diff_of_means(sample: RegionSample, hook_name: str) -> RegionDirection:
    """mean over the region's names − mean over all names (a uniform sample), at every kept position."""
    acts = sample.acts[hook_name]
    mu_r, mu = acts[sample.region_mask()].mean(0), acts[sample.uniform_mask()].mean(0)
    d = mu_r - mu
    dd = float(d @ d) or 1.0
    return RegionDirection(hook_name, d, float(mu_r @ d) / dd, float(mu @ d) / dd)


def probe_direction(
    sample: RegionSample, hook_name: str, steps: int = 300, weight_decay: float = 1e-3, seed: int = 0
) -> RegionDirection:
    """A one-vs-rest logistic probe (class-balanced, full-batch Adam on standardized activations). The direction
    has the probe's orientation in raw activation space and the difference of means' length, so that the same alpha
    moves activations by comparable amounts."""
    acts = sample.acts[hook_name]
    y = sample.region_mask().float()
    mu, sd = acts.mean(0), acts.std(0) + 1e-6
    z = (acts - mu) / sd
    torch.manual_seed(seed)
    w = torch.zeros(acts.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    pos_weight = (1 - y.mean()) / y.mean()  # balanced: the region is the small class
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(z @ w + b, y, pos_weight=pos_weight)
            loss = loss + weight_decay * (w**2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    direction = w.detach() / sd  # z·w = (x − mu)·(w / sd): the probe's weight on raw activations
    dm = diff_of_means(sample, hook_name)
    direction = direction / direction.norm() * dm.direction.norm()
    dd = float(direction @ direction) or 1.0
    mu_r, mu_all = acts[sample.region_mask()].mean(0), acts[sample.uniform_mask()].mean(0)
    return RegionDirection(hook_name, direction, float(mu_r @ direction) / dd, float(mu_all @ direction) / dd)


@dataclass
class RegionFeature:
    index: int
    lift: float  # mean activation on the region's names / mean on all names
    region_active_mean: float  # mean activation where it fires on the region's names
    frequency: float  # share of positions where it fires (all names)


@torch.no_grad()
def region_features(
    sample: RegionSample,
    sae: SAE,
    top: int = 5,
    min_frequency: float = 2e-3,
    hook_name: str | None = None,
    labels: Sequence[dict] | None = None,
) -> list[RegionFeature]:
    """The SAE features most associated with the region. With `labels` (the per-unit rows of
    `interp.monosemanticity`, i.e. the concept bank's scores), the features whose name-level concept is the region,
    best Mono1 first (then by lift when fewer than `top` have that label); without, by lift over the sample."""
    from interp.steering import sae_hook_name

    acts = sample.acts[sae_hook_name(sae, hook_name)]
    f = torch.cat([sae.encode(a).float() for a in acts.split(8192)])
    reg, uni = sample.region_mask(), sample.uniform_mask()
    mean_r, mean = f[reg].mean(0), f[uni].mean(0)
    freq = (f[uni] > 0).float().mean(0)
    active_r = torch.where(f[reg] > 0, f[reg], 0).sum(0) / (f[reg] > 0).sum(0).clamp(min=1)
    lift = (mean_r + 1e-9) / (mean + 1e-9)
    lift[freq < min_frequency] = 0
    order = []
    if labels is not None:
        from interp.monosemanticity import units_for

        order = [r["index"] for r in units_for(labels, f"region={sample.region}", level="name")]
        order = [i for i in order if active_r[i] > 0]
    order += [i for i in lift.argsort(descending=True).tolist() if i not in order]
    return [RegionFeature(i, float(lift[i]), float(active_r[i]), float(freq[i])) for i in order[:top]]


# --- fitted steering vectors ------------------------------------------------------------------------------------------
@dataclass
class FittedVectors:
    """Steering vectors fitted by gradient descent (the model frozen) to make the region's train names likely: one
    vector per hook for each of the first `first` positions and one shared by all later positions (or none)."""

    vectors: dict[str, Tensor]  # hook -> [first + 1, d]
    first: int
    shared: bool
    history: list[dict]

    def hooks(self, model: HookedTransformer, alpha: float = 1.0) -> list[Hook]:
        from interp.steering import Where, add_direction

        out: list[Hook] = []
        for h, v in self.vectors.items():
            for p in range(self.first):
                if v[p].abs().sum() > 0:
                    out += add_direction(model, h, v[p], alpha, where=Where(positions=(p,)))
            if self.shared and v[self.first].abs().sum() > 0:
                out += add_direction(model, h, v[self.first], alpha, where=Where(positions=_from(self.first, model)))
        return out


@torch.no_grad()
def _sequence_log_probs(model: HookedTransformer, tokens: Int[Tensor, "n pos"]) -> Float[Tensor, " n"]:
    from training.lm import token_nll

    return torch.cat([-token_nll(model(_trim(t)), _trim(t)).sum(1) for t in tokens.split(1024)])


def _trim(t: Tensor) -> Tensor:
    return t[:, : int((t != 0).sum(1).max())]


def _from(first: int, model) -> tuple[int, ...]:
    return tuple(range(first, model.cfg.n_ctx))


def fit_region_vectors(
    model: HookedTransformer,
    tokenizer: CharTokenizer,
    corpus: Corpus,
    region: str,
    hook_names: Sequence[str] = ("blocks.0.hook_resid_pre",),
    first: int = 3,
    shared: bool = True,
    steps: int = 150,
    batch_size: int = 64,
    lr: float = 0.05,
    contrast: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    accept: Callable[[list[str]], list[bool]] | None = None,
) -> FittedVectors:
    """Maximize the likelihood of the region's train names under the steered model. With `contrast` > 0, add a
    preference term (as DPO, and BiPO for steering vectors): the steering must raise the region's names more than
    it raises other names, each relative to the unsteered model, with `contrast` as DPO's beta. Likelihood alone
    covers every name of the region, generic ones included ("saint-martin"); the contrast pushes toward what sets
    the region apart. `accept` (names -> booleans) restricts the region's train names to the ones it accepts, e.g. the
    ones a region classifier recognizes (the distinctive names)."""
    from tqdm.auto import tqdm

    from training.lm import mean_nll, token_nll

    check_region(corpus, region)
    names = [c.name for c in corpus.split("train") if c.region == region]
    if accept is not None:
        names = [n for n, k in zip(names, accept(names), strict=True) if k]
        if not names:
            raise VillesError(f"no train name of {region} is kept: nothing to fit")
    others = [c.name for c in corpus.split("train") if c.region != region]
    pool = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:4096].tolist()
    other_tokens = tokenizer.batch([others[i] for i in pool], drop_unknown=True)[:, : model.cfg.n_ctx]
    val = [c.name for c in corpus.split("val") if c.region == region]
    tokens = tokenizer.batch(names, drop_unknown=True)[:, : model.cfg.n_ctx]
    val_tokens = tokenizer.batch(val, drop_unknown=True)[:, : model.cfg.n_ctx] if val else None
    vecs = torch.zeros(len(hook_names), first + 1, model.cfg.d_model, requires_grad=True)
    keep = torch.ones(first + 1, 1)
    if not shared:
        keep[first] = 0

    def make(i):
        def fn(x, hook):
            p = torch.arange(x.shape[1]).clamp(max=first)
            return x + (vecs[i] * keep)[p]

        return fn

    hooks = [(h, make(i)) for i, h in enumerate(hook_names)]
    opt = torch.optim.Adam([vecs], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    if contrast > 0:  # the unsteered log-likelihoods, once: each step then runs only the steered model
        ref, ref_other = _sequence_log_probs(model, tokens), _sequence_log_probs(model, other_tokens)
    grads = [p.requires_grad for p in model.parameters()]
    history = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            for step in tqdm(range(1, steps + 1), desc=f"fit {region}", disable=not progress, dynamic_ncols=True):
                for group in opt.param_groups:  # cosine decay: the last steps settle instead of jittering
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
                idx = torch.randint(len(tokens), (batch_size,), generator=gen)
                t = _trim(tokens[idx])
                logits = model.run_with_hooks(t, fwd_hooks=hooks)
                loss = mean_nll(logits, t)
                if contrast > 0:
                    jdx = torch.randint(len(other_tokens), (batch_size,), generator=gen)
                    o = _trim(other_tokens[jdx])
                    gain_t = -token_nll(logits, t).sum(1) - ref[idx]
                    gain_o = -token_nll(model.run_with_hooks(o, fwd_hooks=hooks), o).sum(1) - ref_other[jdx]
                    loss = loss - F.logsigmoid(contrast * (gain_t - gain_o)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if val_tokens is not None and (step % 50 == 0 or step == steps):
                    with torch.no_grad():
                        clean = float(mean_nll(model(val_tokens), val_tokens))
                        steered = float(mean_nll(model.run_with_hooks(val_tokens, fwd_hooks=hooks), val_tokens))
                    history.append({"step": step, "val_nll_clean": clean, "val_nll_steered": steered})
    finally:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(g)
    v = (vecs.detach() * keep).clone()
    return FittedVectors({h: v[i] for i, h in enumerate(hook_names)}, first, shared, history)


# --- steering toward a region -----------------------------------------------------------------------------------------
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
METHODS = ("fitted", "diff-of-means", "probe", "sae-add", "sae-clamp")
DEFAULT_ALPHA = {"fitted": 1.2, "diff-of-means": 4.0, "probe": 4.0, "sae-add": 4.0, "sae-clamp": 4.0}
FIT = {"first": 5, "shared": True, "steps": 150, "contrast": 0.03}  # the fitted method as benchmarked
SAE_TOP = 3  # region features steered together
CLASSIFIER_CACHE = Path(__file__).resolve().parent.parent / "out" / "bench" / "region_classifier.safetensors"


def residual_hooks(model: HookedTransformer) -> tuple[str, ...]:
    """The residual stream entering each block (block 0's is the embedding) and the final one."""
    last = model.cfg.n_layers - 1
    return (*(f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)), f"blocks.{last}.hook_resid_post")


def parse_hooks(model: HookedTransformer, text: str | Sequence[str] | None) -> list[str]:
    """--hook: one hook, several separated by commas, or "all" (every residual stream of `residual_hooks`)."""
    if text is None:
        return [DEFAULT_HOOK]
    names = [h.strip() for h in text.split(",")] if isinstance(text, str) else list(text)
    if names == ["all"]:
        return list(residual_hooks(model))
    if not names or any(not h for h in names):
        raise VillesError(f"--hook takes hook names separated by commas (or all), got {text!r}")
    return list(dict.fromkeys(names))


def region_steering_hooks(
    model: HookedTransformer,
    tokenizer: CharTokenizer,
    corpus: Corpus,
    region: str,
    method: str = "fitted",
    hook_name: str | Sequence[str] | None = None,
    alpha: float | None = None,
    where: Where | None = None,
    sae: SAE | None = None,
    labels: Sequence[dict] | None = None,
    progress: bool = False,
) -> list[Hook]:
    """The CLI's region steering, one of METHODS:
    - fitted: vectors fitted to the region's names at the residual stream entering each block (`where` and
      `hook_name` do not apply: they have their own positions);
    - diff-of-means, probe: a direction at each hook of `hook_name` (one, a list, or "all"), added with strength alpha;
    - sae-add, sae-clamp: the SAE's SAE_TOP features most associated with the region (from the concept bank's rows
      `labels` when given, else by lift), alpha × their typical activation added, or clamped to it."""
    from interp.steering import check_finite, hook_shape

    check_region(corpus, region)
    if method not in METHODS:
        raise VillesError(f"unknown region steering method {method!r}: choose one of {', '.join(METHODS)}")
    alpha = DEFAULT_ALPHA[method] if alpha is None else check_finite(alpha, "--alpha")
    if method == "fitted":
        if where is not None or hook_name is not None:
            raise VillesError(
                "--method fitted chooses its own hooks and positions: drop --hook/--first/--positions/--after"
            )
        hooks = list(residual_hooks(model)[:-1])
        return fit_region_vectors(model, tokenizer, corpus, region, hooks, **FIT, progress=progress).hooks(model, alpha)
    if method.startswith("sae-"):
        if sae is None:
            raise VillesError(f"--method {method} needs an SAE (--sae DIR)")
        if hook_name is not None:
            raise VillesError(f"--method {method} steers at the SAE's own hook: drop --hook")
        from interp.steering import sae_hook_name

        sample = collect_region_sample(model, tokenizer, corpus, region, [sae_hook_name(sae)])
        feats = region_features(sample, sae, top=SAE_TOP, labels=labels)
        return feature_steering(model, sae, feats, method.removeprefix("sae-"), alpha, where)
    hook_names = parse_hooks(model, hook_name)
    for h in hook_names:
        hook_shape(model, h)
    sample = collect_region_sample(model, tokenizer, corpus, region, hook_names)
    out: list[Hook] = []
    for h in hook_names:
        rd = diff_of_means(sample, h) if method == "diff-of-means" else probe_direction(sample, h)
        out += direction_steering(model, rd, "add", alpha, where)
    return out


def cached_classifier(corpus: Corpus) -> RegionClassifier:
    """The benchmark's cached classifier when it matches this corpus; otherwise one trained now (not written)."""
    if CLASSIFIER_CACHE.is_file():
        clf = RegionClassifier.load(CLASSIFIER_CACHE)
        if clf.fingerprint == _fingerprint(corpus, ClassifierSettings()):
            return clf
    return train_region_classifier(corpus)[0]
