"""The steering benchmark: the region classifier (the measuring stick), a catalogue of SAE features whose steering
changes a named property, and region steering (success against plausibility cost, per method).

    python bench/steering.py [--checkpoint checkpoints/transformer] [--sae checkpoints/sae] [--n 400] [--seed 0]
                             [--quick] [--skip-catalogue] [--skip-regions] [--json out/bench/steering.json]

Definitions (as in issue 7):
- success: share of generated names the region classifier assigns to the target region (argmax);
- cost: NLL per character of the steered names under the unsteered model, minus that of unsteered samples drawn with
  the same seed (nats/char);
- novelty: share of generated names that are not a commune name of the corpus.
The catalogue's features are chosen automatically: for each named property, concept labels per character position
(computed here from the spelling; the concept bank will supply them later) rank the SAE's features by F1, the best
candidates are steered, and the one that changes the property most within the cost budget is kept.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from interp.regions import (
    FIT,
    ClassifierSettings,
    NaiveBayes,
    collect_region_sample,
    diff_of_means,
    direction_steering,
    feature_steering,
    fit_region_vectors,
    load_or_train_classifier,
    probe_direction,
    recall_table,
    region_features,
)
from interp.steering import (
    Edit,
    Where,
    effect_report,
    feature_hooks,
    load_sae_folder,
    tokens_nll,
    unsteered_baseline,
)
from training.checkpoint import atomic_write_json
from training.cli import format_table
from training.data import load_communes
from training.ladder import novelty
from training.neural import load_checkpoint
from training.sampling import SampleSettings, sample_names

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 0.5  # nats/char of plausibility cost
MIN_NOVELTY = 0.9
TARGET = 0.30
REGIONS = ("Bretagne", "Grand Est")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the classifier ---------------------------------------------------------------------------------------------------
def classifier_section(corpus, cache: Path) -> tuple[object, list[dict], dict]:
    t0 = time.perf_counter()
    clf, info = load_or_train_classifier(corpus, cache, ClassifierSettings())
    seconds = time.perf_counter() - t0
    nb = NaiveBayes(corpus)
    rows, summary = [], {"seconds": round(seconds, 1), **{k: v for k, v in info.items() if k != "history"}}
    for split in ("val", "test"):
        lr, base = recall_table(clf.predict, corpus, split), recall_table(nb.predict, corpus, split)
        n = sum(c for _, c in lr.values())
        summary[f"{split}_accuracy"] = sum(r * c for r, c in lr.values()) / n
        summary[f"{split}_accuracy_nb"] = sum(r * c for r, c in base.values()) / n
        if split == "test":
            for region, (recall, count) in lr.items():
                rows.append(
                    {
                        "region": region,
                        "test names": count,
                        "recall (logistic 1-5-grams)": f"{recall:.1%}",
                        "recall (naive Bayes 1-3-grams)": f"{base[region][0]:.1%}",
                        "val recall": f"{recall_table(clf.predict, corpus, 'val').get(region, (0, 0))[0]:.1%}"
                        if region in REGIONS
                        else "",
                    }
                )
    return clf, rows, summary


# --- the catalogue ----------------------------------------------------------------------------------------------------
def _ending(suffix: str) -> Callable[[str, int], bool]:
    # the positions that write the ending: position p predicts name[p], so name[p:] is what is still to be written
    return lambda name, p: name.endswith(suffix) and p >= len(name) - len(suffix)


# property -> (label of a character position, measure on generated names)
CONCEPTS: dict[str, Callable[[str, int], bool]] = {
    "hyphen": lambda name, p: name[p:].startswith("-"),
    "space": lambda name, p: name[p:].startswith(" "),
    "apostrophe": lambda name, p: name[p:].startswith("'"),
    "saint": lambda name, p: name.startswith(("saint-", "sainte-")) and p <= 5,
    "-ville": _ending("ville"),
    "-court": _ending("court"),
    "-y": _ending("y"),
    "-ac": _ending("ac"),
    "-heim": _ending("heim"),
    "article": lambda name, p: name.startswith(("le ", "la ", "les ", "l'")) and p <= name.find(" ") + 1,
    "-sur-": lambda name, p: p > 0 and name[p - 1 :].startswith("-sur-"),
    "length": lambda name, p: p == len(name),  # the position that writes the end
}


def _rate(names: list[str], prop: str) -> float:
    from interp.steering import PROPERTIES

    if prop == "length":
        return sum(map(len, names)) / max(len(names), 1)
    return sum(map(PROPERTIES[prop], names)) / max(len(names), 1)


@torch.no_grad()
def concept_scores(model, tok, corpus, sae, n_names: int = 6000, seed: int = 0) -> dict[str, dict]:
    """Per property: F1 of "feature fires" against the position labels, for every SAE feature, and the feature's mean
    activation on the labelled positions. Positions are the characters (the SAE never reads <bos>)."""
    from interp.steering import activations, sae_hook_name

    train = corpus.split_names("train")
    gen = torch.Generator().manual_seed(seed)
    names = [train[i] for i in torch.randperm(len(train), generator=gen)[:n_names].tolist()]
    names.sort(key=len)
    hook = sae_hook_name(sae)
    fires, acts_all, labels = [], [], {k: [] for k in CONCEPTS}
    for b0 in range(0, len(names), 512):
        chunk = names[b0 : b0 + 512]
        tokens = tok.batch(chunk, drop_unknown=True)[:, : model.cfg.n_ctx]
        f = sae.encode(activations(model, tokens, hook))
        for i, name in enumerate(chunk):
            for p in range(1, min(len(name), model.cfg.n_ctx - 1) + 1):
                for k, label in CONCEPTS.items():
                    labels[k].append(label(name, p))
            keep = torch.arange(1, min(len(name), model.cfg.n_ctx - 1) + 1)
            acts_all.append(f[i, keep])
    acts = torch.cat(acts_all)
    fires = acts > 0
    out = {}
    for k, lab in labels.items():
        y = torch.tensor(lab)
        tp = (fires & y[:, None]).sum(0).float()
        precision = tp / fires.sum(0).clamp(min=1)
        recall = tp / y.sum().clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-9)
        mean_on = torch.where(fires[y], acts[y], 0).sum(0) / fires[y].sum(0).clamp(min=1)
        out[k] = {"f1": f1, "mean_on": mean_on, "support": int(y.sum())}
    return out


def catalogue(model, tok, corpus, sae, n: int, seed: int, quick: bool) -> list[dict]:
    scores = concept_scores(model, tok, corpus, sae, n_names=2000 if quick else 6000, seed=seed)
    settings = SampleSettings(n=n, seed=seed)
    base = unsteered_baseline(model, tok, settings)
    rows = []
    for prop, sc in scores.items():
        candidates = sc["f1"].argsort(descending=True)[: 1 if quick else 2].tolist()
        best = None
        for i in candidates:
            typical = float(sc["mean_on"][i])
            # add: the feature's typical activation, everywhere; scale: amplify it where it already fires (endings
            # are decided late: amplifying in context works where adding everywhere writes the ending too early)
            edits = [Edit("add", typical), Edit("scale", 4.0)]
            if not quick:
                edits += [Edit("add", 0.5 * typical), Edit("scale", 2.0)]
            for edit in edits:
                rep = effect_report(model, tok, corpus, feature_hooks(model, sae, {i: edit}), n=n, seed=seed, base=base)
                before, after = _rate(rep.names_base, prop), _rate(rep.names_steered, prop)
                within = rep.cost <= BUDGET and rep.novelty_steered >= MIN_NOVELTY
                key = (within, abs(after - before) / (max(before, 0.02) if prop != "length" else 1.0))
                if best is None or key > best[0]:
                    best = (key, i, edit, rep, before, after)
        _, i, edit, rep, before, after = best
        ablated = effect_report(model, tok, corpus, feature_hooks(model, sae, {i: Edit("ablate", 0.0)}), n=n, seed=seed)
        abl = _rate(ablated.names_steered, prop)
        fmt = (lambda v: f"{v:.2f}") if prop == "length" else (lambda v: f"{v:.1%}")
        effect = (
            after - before if prop == "length" else 2 * math.asin(math.sqrt(after)) - 2 * math.asin(math.sqrt(before))
        )
        rows.append(
            {
                "property": prop,
                "feature": i,
                "F1": f"{float(sc['f1'][i]):.2f}",
                "steering": f"{edit.op} {edit.value:.2f}",
                "unsteered": fmt(before),
                "steered": fmt(after),
                "effect": f"{effect:+.2f}" + (" chars" if prop == "length" else " h"),
                "ablated": fmt(abl),
                "cost": f"{rep.cost:+.3f}",
                "KL": f"{rep.kl:.3f}",
                "novelty": f"{rep.novelty_steered:.0%}",
                "example": next((s for s in rep.names_steered if s not in rep.names_base), ""),
            }
        )
        log(f"catalogue {prop}: feature {i} {fmt(before)} -> {fmt(after)} (cost {rep.cost:+.3f})")
    return rows


# --- regions ----------------------------------------------------------------------------------------------------------


def _hooks_of(model) -> tuple[str, ...]:
    last = model.cfg.n_layers - 1
    return (
        "blocks.0.hook_resid_pre",
        *(f"blocks.{i}.hook_resid_pre" for i in range(1, model.cfg.n_layers)),
        f"blocks.{last}.hook_resid_post",
    )


class Evaluator:
    def __init__(self, model, tok, corpus, clf, n: int, seed: int):
        self.model, self.tok, self.corpus, self.clf = model, tok, corpus, clf
        self.settings = SampleSettings(n=n, seed=seed)
        self.base, self.nll_base = unsteered_baseline(model, tok, self.settings)

    def __call__(self, hooks, region: str) -> dict:
        s = sample_names(self.model, self.tok, self.settings, fwd_hooks=hooks)
        total, count = tokens_nll(self.model, s.tokens)
        return {
            "success": self.clf.share(s.names, region),
            "cost": total / count - self.nll_base,
            "novelty": novelty(s.names, self.corpus),
            "examples": s.names[:6],
        }


def _best(points: list[dict]) -> dict | None:
    ok = [p for p in points if p["cost"] <= BUDGET and p["novelty"] >= MIN_NOVELTY]
    return max(ok, key=lambda p: p["success"]) if ok else None


def region_steering(model, tok, corpus, sae, clf, region: str, n: int, seed: int, quick: bool) -> dict:
    ev = Evaluator(model, tok, corpus, clf, n, seed)
    hooks_at = _hooks_of(model)
    sae_hook = sae.cfg.metadata.hook_name if sae is not None else None
    sample = collect_region_sample(model, tok, corpus, region, sorted({*hooks_at, *([sae_hook] if sae_hook else [])}))
    base = {"success": ev.clf.share(ev.base.names, region), "cost": 0.0, "novelty": novelty(ev.base.names, corpus)}
    methods: list[dict] = []
    alphas = (1.0, 4.0) if quick else (0.5, 1.0, 2.0, 4.0, 8.0)
    wheres = {"all": None, "first 3": Where(first=3)}

    def sweep(name, hook, where_name, make, alphas=alphas):
        points = []
        for a in alphas:
            p = ev(make(a), region)
            points.append({"alpha": a, **p})
            log(f"  {region} {name} {hook} {where_name} a={a}: {p['success']:.1%} cost {p['cost']:+.3f}")
        methods.append({"method": name, "hook": hook, "positions": where_name, "points": points})

    for hook in hooks_at:
        dm, pr = diff_of_means(sample, hook), probe_direction(sample, hook)
        for wn, where in wheres.items():
            sweep("diff-of-means add", hook, wn, lambda a, dm=dm, w=where: direction_steering(model, dm, "add", a, w))
            if not quick:
                sweep(
                    "diff-of-means clamp",
                    hook,
                    wn,
                    lambda a, dm=dm, w=where: direction_steering(model, dm, "clamp", a, w),
                )
            sweep("probe add", hook, wn, lambda a, pr=pr, w=where: direction_steering(model, pr, "add", a, w))
    if sae is not None:
        feats = region_features(sample, sae, top=3)
        label = "SAE " + ",".join(str(f.index) for f in feats)
        for wn, where in wheres.items():
            sweep(f"{label} add", sae_hook, wn, lambda a, w=where: feature_steering(model, sae, feats, "add", a, w))
            sweep(f"{label} clamp", sae_hook, wn, lambda a, w=where: feature_steering(model, sae, feats, "clamp", a, w))
    fit_hooks = hooks_at[:-1]  # the residual stream entering each block
    fits = [("likelihood", 0.0, True), ("contrastive", FIT["contrast"], True), ("contrastive", FIT["contrast"], False)]
    for kind, contrast, shared in fits[:1] + fits[1:2] if quick else fits:
        t0 = time.perf_counter()
        steps = 60 if quick else FIT["steps"]
        fitted = fit_region_vectors(
            model, tok, corpus, region, fit_hooks, first=FIT["first"], shared=shared, steps=steps, contrast=contrast
        )
        name = f"fitted vectors, {kind}" + (f" b={contrast}" if contrast else "")
        log(f"  {name} fitted in {time.perf_counter() - t0:.0f}s: {fitted.history[-1] if fitted.history else ''}")
        positions = f"first {FIT['first']}" + (" + shared" if shared else "")
        sweep(
            name,
            "+".join(h.replace("blocks.", "b").replace(".hook_", ".") for h in fit_hooks),
            positions,
            lambda a, f=fitted: f.hooks(model, a),
            alphas=(1.0, 1.2) if quick else (0.75, 1.0, 1.1, 1.2, 1.3, 1.5),
        )
    # reference, not steering: keep the unsteered samples the classifier assigns to the region
    many = unsteered_baseline(model, tok, SampleSettings(n=max(4 * n, 2000), seed=seed + 1))
    accepted = [t for t, name in zip(many[0].tokens, many[0].names, strict=True) if clf.share([name], region) == 1]
    reference = None
    if accepted:
        total, count = tokens_nll(model, accepted)
        reference = {"success": 1.0, "cost": total / count - many[1], "accepted": len(accepted) / len(many[0].names)}
    return {"region": region, "base": base, "methods": methods, "rejection_reference": reference}


def region_rows(result: dict) -> list[dict]:
    rows = []
    for m in result["methods"]:
        best = _best(m["points"])
        top = max(m["points"], key=lambda p: p["success"])
        rows.append(
            {
                "region": result["region"],
                "method": m["method"],
                "hook": m["hook"].replace("blocks.", "b").replace(".hook_", "."),  # b0.resid_pre = embedding
                "positions": m["positions"],
                "base": f"{result['base']['success']:.1%}",
                f"best @cost<={BUDGET}": f"{best['success']:.1%} (a={best['alpha']:g})" if best else "-",
                "its cost": f"{best['cost']:+.3f}" if best else "",
                "novelty": f"{best['novelty']:.0%}" if best else "",
                "max success (cost)": f"{top['success']:.1%} ({top['cost']:+.2f})",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "transformer")
    p.add_argument("--sae", type=Path, default=ROOT / "checkpoints" / "sae")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer strengths and candidates (a smoke run)")
    p.add_argument("--skip-catalogue", action="store_true")
    p.add_argument("--skip-regions", action="store_true")
    p.add_argument("--regions", default=",".join(REGIONS))
    p.add_argument("--json", type=Path, default=ROOT / "out" / "bench" / "steering.json")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    corpus = load_communes()
    model, tok, _ = load_checkpoint(args.checkpoint)
    sae = load_sae_folder(args.sae) if (args.sae / "cfg.json").is_file() else None
    report: dict = {"checkpoint": str(args.checkpoint), "sae": str(args.sae) if sae is not None else None, "n": args.n}

    t0 = time.perf_counter()
    clf, rows, summary = classifier_section(corpus, ROOT / "out" / "bench" / "region_classifier.safetensors")
    report["classifier"] = {"summary": summary, "rows": rows}
    print("## Region classifier (held-out test split; logistic regression over character 1-5-grams vs the floor)")
    print(format_table(rows, list(rows[0])))
    print(
        f"accuracy: test {summary['test_accuracy']:.1%} (naive Bayes {summary['test_accuracy_nb']:.1%}), "
        f"val {summary['val_accuracy']:.1%} (naive Bayes {summary['val_accuracy_nb']:.1%})\n"
    )

    if not args.skip_catalogue:
        if sae is None:
            print(f"## Catalogue: skipped (no SAE in {args.sae})\n")
        else:
            cat = catalogue(model, tok, corpus, sae, args.n, args.seed, args.quick)
            report["catalogue"] = cat
            print(f"## Catalogue: SAE features of {args.sae.name} ({sae.cfg.metadata.hook_name}), chosen by concept F1")
            print(format_table(cat, list(cat[0])))
            print("effect: Cohen's h of the property's rate (|h| 0.2 small, 0.5 medium, 0.8 large); length in chars\n")

    if not args.skip_regions:
        results = []
        for region in args.regions.split(","):
            results.append(region_steering(model, tok, corpus, sae, clf, region, args.n, args.seed, args.quick))
        report["regions"] = results
        rows = [r for res in results for r in region_rows(res)]
        print(f"## Region steering: success at plausibility cost <= {BUDGET} nats/char and novelty >= 90%")
        print(format_table(rows, list(rows[0])))
        for res in results:
            ref = res["rejection_reference"]
            if ref:
                print(
                    f"{res['region']}: unsteered samples the classifier assigns to it ({ref['accepted']:.1%} of them) "
                    f"cost {ref['cost']:+.3f} nats/char: the price of real conditioning, for reference"
                )
    report["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(args.json, report)
    print(f"\n({report['seconds']:.0f} s; full sweep in {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
