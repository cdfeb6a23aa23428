"""`villes demo`: the main job on the shipped checkpoints, no training. Each stage writes under `out/` and adds a
section to `out/index.html`; the terminal gets a short text summary.

Stages, in order (each can be run alone with `run_demo(stages=...)`):
    ladder          every rung, train/val NLL, novelty, samples            ladder.json
    sae             the SAE's quality line (its metrics.json, or a quick evaluation)   sae.json
    monosemanticity every feature, neuron and basis direction scored against the concept bank, random-direction
                    and top-k-neuron controls (the random-model SAE control needs training: left to the command)
                                                                           monosemanticity/
    dashboards      one page per feature and per MLP neuron, labelled with the best concept   dashboards/
    steering        a catalogue excerpt (one feature per property, picked by its concept label) and the region
                    table (difference-of-means and probe directions toward Bretagne and Grand Est)   steering.json
    attribution     which concepts made each letter of a few names         attribution/

Below them: the small views the notebooks use (per-character surprise, attention, feature activations), so that no
notebook computes anything the library does not.
"""

from __future__ import annotations

import dataclasses
import html
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from training.checkpoint import atomic_write_json, atomic_write_text
from training.errors import VillesError

if TYPE_CHECKING:
    from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
STAGE_NAMES = ("ladder", "sae", "monosemanticity", "dashboards", "steering", "attribution")
REGIONS = ("Bretagne", "Grand Est")
# the cheap directions that moved a region most within 0.5 nats/char in bench/steering.py (probe at the second
# block's input: Grand Est 18.7% -> 42.7%); the fitted vectors that also move Bretagne need ~45 s of fitting each
REGION_HOOK = "blocks.1.hook_resid_pre"
REGION_ALPHA = {"diff-of-means": 4.0, "probe": 16.0}
ATTRIBUTION_NAMES = ("saint-malo", "plougastel-daoulas", "villeneuve-sur-lot")


@dataclass(frozen=True)
class DemoSettings:
    checkpoint: Path = ROOT / "checkpoints" / "transformer"
    sae: Path = ROOT / "checkpoints" / "sae"
    stages: tuple[str, ...] = STAGE_NAMES
    max_names: int | None = None  # the dashboards read every name of the corpus; fewer for a quick run
    # monosemanticity: every name by default (≈ 35 s here); a seeded sample of 12,000 moves the medians by ≤ 0.01
    mono_names: int | None = None
    novelty_samples: int = 1000  # ladder: samples per rung for the novelty column
    train_sample: int | None = 4000  # ladder: train NLL on a seeded sample of train names (None: all of them)
    steer_n: int = 200  # names generated per steering setting
    attribution_names: tuple[str, ...] = ATTRIBUTION_NAMES
    seed: int = 0

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown or not self.stages:
            raise VillesError(f"unknown demo stage {unknown[0] if unknown else '(none)'!r}: choose from "
                              f"{', '.join(STAGE_NAMES)}")  # fmt: skip
        for folder in (self.checkpoint, self.sae):
            if not Path(folder).is_dir():
                raise VillesError(f"checkpoint folder not found: {folder}")


@dataclass
class Context:
    """What the stages share, loaded once when first asked for."""

    out: Path
    settings: DemoSettings
    progress: bool
    rows: list[dict] | None = None  # monosemanticity rows, when that stage ran
    baseline: tuple | None = None  # unsteered samples and their NLL, shared by the steering measures
    summary: dict = field(default_factory=dict)  # one short line per stage for the terminal

    @cached_property
    def model(self):
        from training.transformer import load_model

        return load_model(self.settings.checkpoint)

    @cached_property
    def sae(self):
        from training.sae import load_sae

        return load_sae(self.settings.sae, self.settings.checkpoint)

    @cached_property
    def corpus(self):
        from training.checkpoint import read_json
        from training.data import load_corpus

        info = read_json(Path(self.settings.checkpoint) / "config.json").get("corpus", {})
        return load_corpus(info.get("names_file"), lowercase=info.get("lowercase", True))

    @cached_property
    def tokenizer(self):
        from training.sae import char_tokenizer

        return char_tokenizer(self.model)

    def sample(self, n: int | None) -> list:
        """Every commune of the corpus, or a seeded sample of n of them (in corpus order)."""
        import random

        communes = self.corpus.split("all")
        if n is None or n >= len(communes):
            return communes
        return [communes[i] for i in sorted(random.Random(self.settings.seed).sample(range(len(communes)), n))]

    @cached_property
    def communes(self):
        """The names the dashboards read: every name (or a seeded sample of max_names)."""
        return self.sample(self.settings.max_names)

    @cached_property
    def mono_communes(self):
        """The names monosemanticity scores: a seeded sample of mono_names (at most max_names)."""
        sizes = [n for n in (self.settings.max_names, self.settings.mono_names) if n is not None]
        return self.sample(min(sizes) if sizes else None)


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    from training.cli import format_table

    return format_table(rows, columns or list(rows[0])) if rows else "(none)"


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


# --- stages: each returns (terminal text, index.html section) ---------------------------------------------------------
def ladder_stage(ctx: Context) -> tuple[str, str]:
    from training.ladder import ladder

    checkpoints = {"transformer": Path(ctx.settings.checkpoint)}
    rows, notes = ladder(ctx.corpus, checkpoints=checkpoints, n_novelty=ctx.settings.novelty_samples,
                         seed=ctx.settings.seed, progress=ctx.progress,
                         train_sample=ctx.settings.train_sample)  # fmt: skip
    atomic_write_json(ctx.out / "ladder.json", [dataclasses.asdict(r) for r in rows])
    text = _table([r.display() for r in rows]) + "".join(f"\n{n}" for n in notes)
    top = rows[-1]
    ctx.summary["ladder"] = f"{len(rows)} rungs, top: {top.model} val {top.val_nll:.3f} nats/char"
    section = (
        "<h2 id='ladder'>The ladder</h2><p>Every rung scored on the same held-out names (nats per predicted "
        "character, the end included), with samples.</p>" + _pre(text) + "<p><a href='ladder.json'>ladder.json</a></p>"
    )
    return text, section


SAE_KEYS = ("l0", "explained_variance", "loss_recovered", "ce_loss_clean", "ce_loss_spliced", "dead_fraction")


def sae_stage(ctx: Context) -> tuple[str, str]:
    """The quality line from the SAE folder's metrics.json (measured on the whole val split when it was trained);
    an SAE folder without one is evaluated now on up to 500 validation names."""
    from training.checkpoint import read_json
    from training.sae import evaluate_sae

    path = Path(ctx.settings.sae) / "metrics.json"
    if path.is_file():
        metrics, source = read_json(path), f"{path.name} (val split, {read_json(path).get('n_names', '?')} names)"
    else:
        names = ctx.corpus.split_names("val")[:500]
        metrics, source = evaluate_sae(ctx.model, ctx.sae, names), f"evaluated now on {len(names)} val names"
    cfg = ctx.sae.cfg
    line = (
        f"SAE {type(ctx.sae).__name__} on {cfg.metadata.hook_name}: {cfg.d_in} -> {cfg.d_sae} latents; "
        + ", ".join(f"{k} {metrics[k]:.4g}" for k in SAE_KEYS if k in metrics)
        + f" [{source}]"
    )
    atomic_write_json(ctx.out / "sae.json", {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "hook": cfg.metadata.hook_name,
                                            "source": source, **{k: metrics.get(k) for k in SAE_KEYS}})  # fmt: skip
    ctx.summary["sae"] = f"L0 {metrics.get('l0', float('nan')):.1f}, loss recovered " \
                         f"{metrics.get('loss_recovered', float('nan')):.3f}"  # fmt: skip
    return line, "<h2 id='sae'>The sparse autoencoder</h2>" + _pre(line)


def monosemanticity_stage(ctx: Context) -> tuple[str, str]:
    from interp.monosemanticity import format_summary, monosemanticity, write_report

    communes = ctx.mono_communes
    report = monosemanticity(ctx.model, ctx.sae, [c.name for c in communes], [c.region for c in communes],
                             controls=True, progress=ctx.progress)  # fmt: skip
    report.info.update(checkpoint=str(ctx.settings.checkpoint), sae=str(ctx.settings.sae), control_sae=None)
    write_report(report, ctx.out / "monosemanticity")
    ctx.rows = report.rows
    text = format_summary(report.summary)
    med = {s["kind"]: s["mono1"] for s in report.summary if s["mono1"] and not s["control"]}
    medians = ", ".join(f"{k} {v[1]:.2f}" for k, v in med.items())
    ctx.summary["monosemanticity"] = f"{len(communes):,} names, median Mono1 {medians}"
    section = (
        "<h2 id='monosemanticity'>Monosemanticity</h2><p>Every unit scored against the automatic concept bank "
        f"of {len(communes):,} names (Mono1: held-out F1 of the best concept). Controls: random directions and "
        "top-k neurons; the random-model SAE control needs a training run (<code>villes monosemanticity</code>).</p>"
        + _pre(text)
        + "<p><a href='monosemanticity/figures.html'>distributions (figures)</a> · "
        "<a href='monosemanticity/units.csv'>every unit (CSV)</a> · "
        "<a href='monosemanticity/summary.txt'>summary</a></p>"
    )
    return text, section


def dashboards_stage(ctx: Context) -> tuple[str, str]:
    from interp.activations import StoreSettings
    from interp.dashboards import DashboardSettings, dashboards

    communes = ctx.communes
    result = dashboards(ctx.model, ctx.sae, None, ctx.out / "dashboards", neurons=True,
                        names=[c.name for c in communes], regions=[c.region for c in communes],
                        settings=DashboardSettings(store=StoreSettings(split="all")), labels=ctx.rows,
                        tokenizer=ctx.tokenizer, progress=ctx.progress,
                        model_id=f"villes/{Path(ctx.settings.checkpoint).name}")  # fmt: skip
    text = _table(result.sets, ["id", "hook", "kind", "units", "dead", "dense"])
    ctx.summary["dashboards"] = f"{result.pages} pages"
    section = (
        "<h2 id='dashboards'>Dashboards</h2>"
        f"<p><a href='dashboards/index.html'>{result.pages} unit pages</a>: every SAE feature and every MLP neuron "
        "(top examples, histograms, logit effects, ablation and clamped generations, neighbours, concept label).</p>"
        + _pre(text)
    )
    return text, section


def _baseline(ctx: Context) -> tuple:
    from interp.steering import unsteered_baseline
    from training.sampling import SampleSettings

    if ctx.baseline is None:
        settings = SampleSettings(n=ctx.settings.steer_n, seed=ctx.settings.seed)
        ctx.baseline = unsteered_baseline(ctx.model, ctx.tokenizer, settings)
    return ctx.baseline


def catalogue(ctx: Context) -> list[dict]:
    """interp.steering.steering_catalogue on the monosemanticity stage's labels: one candidate feature per property,
    the steering that changes a property most within 0.5 nats/char kept (typical sizes from 2,000 names)."""
    from interp.steering import feature_mean_when_active, steering_catalogue

    if ctx.rows is None:
        return []
    names = [c.name for c in ctx.sample(2000)]
    mean_on = feature_mean_when_active(ctx.model, ctx.sae, names)
    return steering_catalogue(ctx.model, ctx.tokenizer, ctx.corpus, ctx.sae, ctx.rows, mean_on,
                              n=ctx.settings.steer_n, seed=ctx.settings.seed, base=_baseline(ctx))  # fmt: skip


def region_table(ctx: Context) -> list[dict]:
    """Toward each region: the classifier's share of generated names in that region, unsteered and with a
    difference-of-means or probe direction added at the second block's input (REGION_HOOK), with cost."""
    from interp.regions import (
        DEFAULT_HOOK,
        cached_classifier,
        collect_region_sample,
        diff_of_means,
        direction_steering,
        probe_direction,
    )  # fmt: skip
    from interp.steering import tokens_nll
    from training.ladder import novelty
    from training.sampling import SampleSettings, sample_names

    s = ctx.settings
    settings = SampleSettings(n=s.steer_n, seed=s.seed)
    present = {c.region for c in ctx.corpus.communes}
    regions = [r for r in REGIONS if r in present]  # a names file has no regions: no table
    if not regions:
        return []
    clf = cached_classifier(ctx.corpus)
    clean, nll_base = _baseline(ctx)
    hook = REGION_HOOK if REGION_HOOK in ctx.model.hook_dict else DEFAULT_HOOK
    rows = []
    for region in regions:
        rows.append({
            "region": region, "method": "unsteered", "alpha": "", "success": f"{clf.share(clean.names, region):.1%}",
            "cost": "+0.000", "novelty": f"{novelty(clean.names, ctx.corpus):.0%}", "examples": "",
        })  # fmt: skip
        sample = collect_region_sample(ctx.model, ctx.tokenizer, ctx.corpus, region, [hook])
        for method, make in (("diff-of-means", diff_of_means), ("probe", probe_direction)):
            alpha = REGION_ALPHA[method]
            hooks = direction_steering(ctx.model, make(sample, hook), "add", alpha)
            steered = sample_names(ctx.model, ctx.tokenizer, settings, fwd_hooks=hooks)
            total, count = tokens_nll(ctx.model, steered.tokens)
            rows.append({
                "region": region, "method": f"{method} add @ {hook}", "alpha": f"{alpha:g}",
                "success": f"{clf.share(steered.names, region):.1%}", "cost": f"{total / count - nll_base:+.3f}",
                "novelty": f"{novelty(steered.names, ctx.corpus):.0%}", "examples": ", ".join(steered.names[:3]),
            })  # fmt: skip
    return rows


def steering_stage(ctx: Context) -> tuple[str, str]:
    cat = catalogue(ctx)
    regions = region_table(ctx)
    atomic_write_json(ctx.out / "steering.json", {"catalogue": cat, "regions": regions, "n": ctx.settings.steer_n})
    text = (
        f"catalogue ({ctx.settings.steer_n} names per setting, same seed as the unsteered ones):\n"
        + (_table(cat) if cat else "(needs the monosemanticity stage's labels)")
        + "\n\nregion steering:\n"
        + (_table(regions) if regions else "(the corpus has no region metadata)")
    )
    ctx.summary["steering"] = f"{len(cat)} catalogue features, {len(regions)} region rows"
    section = (
        "<h2 id='steering'>Steering</h2><p>Catalogue: for each property of a name, the best-scored SAE feature "
        "labelled with one of its concepts, added or amplified, the steering that changes a property most within "
        "0.5 nats/char kept (effect: Cohen's h, or characters for length); region table: directions toward a "
        "region added at the second block's input, success measured by the region classifier (the fitted vectors "
        "that also move Bretagne, and every other method, are in the full benchmark): "
        "<code>python bench/steering.py</code>; one intervention: <code>villes steer</code>.</p>"
        + _pre(text)
        + "<p><a href='steering.json'>steering.json</a></p>"
    )
    return text, section


def attribution_stage(ctx: Context) -> tuple[str, str]:
    from interp.attribution import attribute, format_summary, write_html

    folder = ctx.out / "attribution"
    folder.mkdir(parents=True, exist_ok=True)
    links, texts = [], []
    for name in ctx.settings.attribution_names:
        result = attribute(ctx.model, ctx.sae, name, labels=ctx.rows,
                           feature_link="../dashboards/units/sae/{index}.html")  # fmt: skip
        file = name.replace(" ", "_").replace("'", "_") + ".html"
        write_html(result, folder / file)
        links.append(f"<li><a href='attribution/{html.escape(file)}'>{html.escape(name)}</a></li>")
        texts.append(f"{name}\n{format_summary(result)}")
    text = "\n\n".join(texts)
    ctx.summary["attribution"] = f"{len(links)} names"
    section = (
        "<h2 id='attribution'>Attribution</h2><p>Which SAE features made each letter: direct effect, gradient x "
        "activation, integrated gradients and the true ablation, with how far to trust each.</p><ul>"
        + "".join(links)
        + "</ul>"
        + _pre(text)
    )
    return text, section


STAGES = {
    "ladder": ladder_stage,
    "sae": sae_stage,
    "monosemanticity": monosemanticity_stage,
    "dashboards": dashboards_stage,
    "steering": steering_stage,
    "attribution": attribution_stage,
}


def run_demo(out: Path | str = "out", progress: bool = True, settings: DemoSettings = DemoSettings()) -> str:
    """Run the stages into `out`, write `out/index.html` (a section per stage) and `out/timings.json`; returns the
    terminal summary."""
    import torch

    settings.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VillesError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out, settings, progress)
    sections, timings = [], {}
    for name in STAGE_NAMES:
        if name not in settings.stages:
            continue
        t = time.perf_counter()
        if progress:
            print(f"villes demo: {name}", flush=True)
        text, section = STAGES[name](ctx)
        timings[name] = round(time.perf_counter() - t, 1)
        sections.append(section + f"<p class='t'>{timings[name]} s</p>")
    nav = " · ".join(f"<a href='#{n}'>{n}</a>" for n in STAGE_NAMES if n in settings.stages)
    page = (
        "<!doctype html><meta charset='utf-8'><title>villes demo</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:90em;margin:2em auto;padding:0 1em}"
        "pre{font-size:12px;overflow-x:auto}.t{color:#888;font-size:12px}</style>"
        "<h1>villes: French commune names, generated and opened</h1>"
        f"<p>{nav}</p>" + "".join(sections)
    )
    atomic_write_text(out / "index.html", page)
    atomic_write_json(out / "timings.json", {**timings, "torch_threads": torch.get_num_threads()})
    lines = [f"{k:16s} {v}" for k, v in ctx.summary.items()]
    total = sum(timings.values())
    return "\n".join(lines) + f"\n\nopen {out / 'index.html'} ({total:.0f} s: " + \
        ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ")"  # fmt: skip


# --- small views shared by the notebooks and the demo ---------------------------------------------------------------
# The notebooks call these instead of computing anything themselves: per-character surprise under any rung, attention
# patterns and SAE feature activations along a name, each as numbers and as a circuitsvis view.


def shown(symbol: str) -> str:
    """How a symbol is drawn in the views: ^ for <bos>, $ for <eos>, ␣ for a space (as the dashboards do)."""
    return {"<bos>": "^", "<eos>": "$", " ": "\u2423", "<pad>": "\u2205"}.get(symbol, symbol)


def char_surprise(lm, name: str) -> tuple[list[str], list[float]]:
    """(symbols, nats): the negative log-probability a rung gives to each character of `name` and to its end, given
    what comes before. `lm` is a ladder level (`training.ladder.load_level`) or a HookedTransformer."""
    import math

    import torch

    from training.sae import char_tokenizer
    from training.tokenizer import BOS_ID

    model = getattr(lm, "model", lm)  # a ladder level wraps its model; a HookedTransformer is its own
    tok = lm.tokenizer if model is not lm else char_tokenizer(model)
    ids = tok.encode(name)
    symbols = [shown(tok.itos[i]) for i in ids[1:]]
    if hasattr(model, "prob"):  # a counting model (n-gram family)
        n = model.order
        padded = [BOS_ID] * max(n - 1, 1) + ids[1:]
        start = max(n - 1, 1)
        nats = [
            -math.log(model.prob(tuple(padded[i - n + 1 : i]) if n > 1 else (), padded[i]))
            for i in range(start, len(padded))
        ]
        return symbols, nats
    from training.lm import token_nll

    tokens = torch.tensor([ids])
    with torch.no_grad():
        nats = token_nll(model(tokens), tokens)[0].tolist()
    return symbols, nats


def surprise_view(lm, name: str, max_value: float = 5.0):
    """circuitsvis coloured letters: each symbol of `name` (and the end, $) coloured by its surprise in nats."""
    from circuitsvis.tokens import colored_tokens

    symbols, nats = char_surprise(lm, name)
    return colored_tokens(symbols, nats, min_value=0.0, max_value=max_value, positive_color="red")


def attention_view(model, name: str, layer: int = 0):
    """circuitsvis attention patterns of every head of `layer` on `name` (<bos> included)."""
    from circuitsvis.attention import attention_patterns

    tokens = _tokens(model, name)
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_pattern")
    labels = [shown(s) for s in _symbols(model, tokens[0])]
    return attention_patterns(tokens=labels, attention=cache[f"blocks.{layer}.attn.hook_pattern"][0])


def _tokens(model, name: str):
    import torch

    from training.sae import char_tokenizer

    return torch.tensor([char_tokenizer(model).encode(name)])


def _symbols(model, ids) -> list[str]:
    from training.sae import char_tokenizer

    tok = char_tokenizer(model)
    return [tok.itos[int(i)] for i in ids]


def feature_activations(model, sae, name: str, top: int = 5) -> tuple[list[str], list[int], Tensor]:
    """(symbols, feature indices, activations [symbols, top]): the `top` SAE features with the largest activation
    anywhere in `name`, read at the SAE's hook. Shown from <bos> (^) to <eos> ($), but read only where the SAE was
    trained (the characters: `training.sae.sae_positions`); elsewhere 0."""
    import torch

    from training.sae import sae_positions

    hook = sae.cfg.metadata.hook_name
    tokens = _tokens(model, name)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
        acts = sae.encode(cache[hook][0]) * sae_positions(tokens)[0, :, None]
    best = acts.max(0).values.topk(top).indices
    return [shown(s) for s in _symbols(model, tokens[0])], best.tolist(), acts[:, best]


def feature_view(model, sae, name: str, top: int = 5):
    """circuitsvis coloured letters, one row per feature: the `top` features most active on `name`."""
    from circuitsvis.tokens import colored_tokens_multi

    symbols, index, acts = feature_activations(model, sae, name, top)
    return colored_tokens_multi(symbols, acts, labels=[f"feature {i}" for i in index])


def ngram_sweep(corpus, orders=(1, 2, 3, 4, 5), split: str = "val") -> list[dict]:
    """One row per n-gram order: parameters (stored counts) and NLL on `split` in nats per predicted symbol."""
    from training.ladder import load_level

    rows = []
    for order in orders:
        lm = load_level("ngram", corpus, order)
        nats, count = lm.nll(corpus.split_names(split))
        rows.append({"order": order, "params": lm.params, f"{split}_nll": round(nats / count, 4)})
    return rows


def level_summary(lm, corpus, n_samples: int = 8, seed: int = 0) -> dict:
    """A rung at a glance: parameters, validation NLL and a few samples."""
    from training.sampling import SampleSettings

    nats, count = lm.nll(corpus.split_names("val"))
    samples = lm.sample(SampleSettings(n=n_samples, seed=seed))
    return {"model": lm.name, "params": lm.params, "val_nll": round(nats / count, 4), "samples": samples}


def top_names(model, names, hook: str, index: int, sae=None, k: int = 8) -> list[tuple[str, list[float]]]:
    """The `k` names where a unit peaks highest, each with the unit's activation at every character: an SAE feature
    (`sae` given: latent `index` of the SAE on `hook`) or a coordinate of `hook` (an MLP neuron, a basis direction)."""
    import torch

    from training.sae import char_tokenizer, sae_positions

    tok = char_tokenizer(model)
    peaks, values = [], []
    with torch.no_grad():
        for start in range(0, len(names), 1024):
            batch = list(names[start : start + 1024])
            tokens = tok.batch(batch)
            _, cache = model.run_with_cache(tokens, names_filter=hook)
            x = cache[hook]
            a = (sae.encode(x)[..., index] if sae is not None else x[..., index]) * sae_positions(tokens)
            peaks.append(a.max(1).values)
            values += [a[i, 1 : len(n) + 1].tolist() for i, n in enumerate(batch)]
    best = torch.cat(peaks).topk(min(k, len(names))).indices.tolist()
    return [(names[i], values[i]) for i in best]


def top_names_view(model, names, hook: str, index: int, sae=None, k: int = 8):
    """circuitsvis coloured letters: the unit's top names, one after another (separated by ' · ')."""
    from circuitsvis.tokens import colored_tokens

    symbols, values = [], []
    for name, acts in top_names(model, names, hook, index, sae, k):
        symbols += [shown(c) for c in name] + [" · "]
        values += acts + [0.0]
    return colored_tokens(symbols, values)
