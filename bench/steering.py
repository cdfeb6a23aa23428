"""The steering benchmark: the region classifier (the measuring stick), a catalogue of SAE features whose steering
changes a named property, and region steering (success against plausibility cost, per method).

    python bench/steering.py [--checkpoint checkpoints/transformer] [--sae checkpoints/sae] [--n 300] [--seed 0]
                             [--quick] [--skip-classifier] [--skip-catalogue] [--skip-regions] [--regions R1,R2]

Definitions (as in issue 7):
- success: share of generated names the region classifier assigns to the target region (argmax);
- cost: NLL per character of the steered names under the unsteered model, minus that of unsteered samples drawn with
  the same seed (nats/char);
- novelty: share of generated names that are not a commune name of the corpus.
The catalogue's features are chosen automatically: the monosemanticity scores (`interp.monosemanticity`, against the
concept bank of `interp.concepts`) label every SAE feature; for each property, the best-scored features labelled with
its concepts are steered, every property is measured, and per property the steering that changes it most within the
cost budget is kept (each feature at most once). Region SAE features come from the same labels (name-level region
concepts). `--quick` (the numbers reported for issue 7, on a shared 2-core machine) steers one candidate per
property and sweeps fewer settings; the labels are cached in out/bench/steering_labels.json (parallel runs share them):

    python bench/steering.py --quick --skip-regions --n 300
    python bench/steering.py --quick --skip-classifier --skip-catalogue --regions Bretagne --n 300
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from interp import regions as rg
from interp.steering import (
    Where,
    feature_mean_when_active,
    steering_catalogue,
    tokens_nll,
    unsteered_baseline,
)
from training.checkpoint import atomic_write_json
from training.cli import format_table
from training.data import load_communes
from training.ladder import novelty
from training.neural import load_checkpoint
from training.sae import load_sae
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
    clf, info = rg.load_or_train_classifier(corpus, cache, rg.ClassifierSettings())
    seconds = time.perf_counter() - t0
    nb = rg.NaiveBayes(corpus)
    rows, summary = [], {"seconds": round(seconds, 1), **{k: v for k, v in info.items() if k != "history"}}
    for split in ("val", "test"):
        lr, base = rg.recall_table(clf.predict, corpus, split), rg.recall_table(nb.predict, corpus, split)
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
                        "val recall": f"{rg.recall_table(clf.predict, corpus, 'val').get(region, (0, 0))[0]:.1%}"
                        if region in REGIONS
                        else "",
                    }
                )
    return clf, rows, summary


def concept_labels(model, corpus, sae, n_names: int, seed: int) -> tuple[list[dict], torch.Tensor]:
    """The monosemanticity rows of the SAE's features (and the model's units) against the concept bank of a sample of
    train names, and every feature's mean activation where it fires on that sample."""
    from interp.monosemanticity import monosemanticity

    train = corpus.split("train")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train), generator=gen)[:n_names].tolist()
    names, regions = [train[i].name for i in pick], [train[i].region for i in pick]
    report = monosemanticity(model, sae, names, regions, controls=False)
    return report.rows, feature_mean_when_active(model, sae, names)


class Labels:
    """`concept_labels`, computed on first use and kept in a JSON file (parallel runs of the benchmark share it)."""

    def __init__(self, model, corpus, sae, sae_dir: Path, n_names: int, seed: int, cache: Path | None):
        self.args, self.cache = (model, corpus, sae, n_names, seed), cache
        self.key = {"sae": str(Path(sae_dir).resolve()), "n_names": n_names, "seed": seed}
        self.value = None

    def get(self) -> tuple[list[dict], torch.Tensor]:
        import json

        if self.value is None and self.cache is not None and self.cache.is_file():
            data = json.loads(self.cache.read_text(encoding="utf-8"))
            if data.get("key") == self.key:
                self.value = data["rows"], torch.tensor(data["mean_on"])
        if self.value is None:
            t0 = time.perf_counter()
            self.value = concept_labels(*self.args)
            log(f"concept labels (monosemanticity scores) in {time.perf_counter() - t0:.0f}s")
            if self.cache is not None:
                atomic_write_json(
                    self.cache, {"key": self.key, "rows": self.value[0], "mean_on": self.value[1].tolist()}
                )
        return self.value


def catalogue(model, tok, corpus, sae, labels: Labels, n: int, seed: int, quick: bool) -> list[dict]:
    """`interp.steering.steering_catalogue` with this benchmark's budget (one candidate per property with --quick)."""
    rows, mean_on = labels.get()
    return steering_catalogue(model, tok, corpus, sae, rows, mean_on, n=n, seed=seed, per_property=1 if quick else 2,
                              budget=BUDGET, min_novelty=MIN_NOVELTY, log=log)  # fmt: skip


# --- regions ----------------------------------------------------------------------------------------------------------
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


def _short(hook: str) -> str:
    return hook.replace("blocks.", "b").replace(".hook_", ".")  # b0.resid_pre is the embedding


def region_steering(model, tok, corpus, sae, clf, labels: Labels | None, region: str, n, seed, quick) -> dict:
    ev = Evaluator(model, tok, corpus, clf, n, seed)
    hooks_at = rg.residual_hooks(model)
    sae_hook = sae.cfg.metadata.hook_name if sae is not None else None
    sample = rg.collect_region_sample(model, tok, corpus, region, sorted({*hooks_at, sae_hook} - {None}))
    base = {"success": ev.clf.share(ev.base.names, region), "cost": 0.0, "novelty": novelty(ev.base.names, corpus)}
    methods: list[dict] = []
    alphas = (4.0, 16.0, 64.0)
    wheres = {"all": None, "first 3": Where(first=3)}

    def sweep(name, hook, where_name, make, alphas=alphas):
        points = []
        for a in alphas:
            p = ev(make(a), region)
            points.append({"alpha": a, **p})
            log(f"  {region} {name} {hook} {where_name} a={a}: {p['success']:.1%} cost {p['cost']:+.3f}")
            if p["cost"] > 2 * BUDGET:  # past the budget: stronger settings only cost more
                break
        methods.append({"method": name, "hook": hook, "positions": where_name, "points": points})

    dirs = {h: (rg.diff_of_means(sample, h), rg.probe_direction(sample, h)) for h in hooks_at}
    for hook_set in [[h] for h in hooks_at] + [list(hooks_at)]:
        label = "+".join(_short(h) for h in hook_set) if len(hook_set) < len(hooks_at) else "all residuals"
        for wn, where in wheres.items() if len(hook_set) > 1 or not quick else list(wheres.items())[:1]:
            for k, kind in enumerate(("diff-of-means", "probe")):
                rds = [dirs[h][k] for h in hook_set]
                sweep(
                    f"{kind} add",
                    label,
                    wn,
                    lambda a, rds=rds, w=where: [
                        x for rd in rds for x in rg.direction_steering(model, rd, "add", a, w)
                    ],
                )
    if sae is not None:
        feats = rg.region_features(sample, sae, top=rg.SAE_TOP, labels=labels.get()[0] if labels else None)
        label = "SAE " + ",".join(str(f.index) for f in feats)
        for wn, where in wheres.items():
            for mode in ("add", "clamp"):
                sweep(
                    f"{label} {mode}",
                    _short(sae_hook),
                    wn,
                    lambda a, w=where, mode=mode: rg.feature_steering(model, sae, feats, mode, a, w),
                    alphas=(1.0, 4.0) if quick else (1.0, 2.0, 4.0),
                )
    fit_hooks = hooks_at[:-1]  # the residual stream entering each block
    fits = [("contrastive", rg.FIT["contrast"], None)]
    if not quick:  # also: likelihood only; and fitted to the region's names that the classifier recognizes
        fits.insert(0, ("likelihood", 0.0, None))
    fits.append(("contrastive, recognized names", rg.FIT["contrast"], lambda names: clf.is_region(names, region)))
    for kind, contrast, accept in fits:
        t0 = time.perf_counter()
        steps = rg.FIT["steps"]
        fitted = rg.fit_region_vectors(
            model, tok, corpus, region, fit_hooks, first=rg.FIT["first"], shared=True, steps=steps, contrast=contrast,
            accept=accept,
        )  # fmt: skip
        name = f"fitted vectors, {kind}" + (f" b={contrast}" if contrast else "")
        log(f"  {name} fitted in {time.perf_counter() - t0:.0f}s: {fitted.history[-1] if fitted.history else ''}")
        sweep(
            name,
            "+".join(_short(h) for h in fit_hooks),
            f"first {rg.FIT['first']} + shared",
            lambda a, f=fitted: f.hooks(model, a),
            alphas=(1.0, 1.2, 1.4) if quick else (1.0, 1.2, 1.4, 1.7),
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
                "hook": m["hook"],
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
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer settings, candidates and fitting steps")
    p.add_argument("--skip-classifier", action="store_true", help="load the cached classifier, print no table")
    p.add_argument("--skip-catalogue", action="store_true")
    p.add_argument("--labels-cache", type=Path, default=ROOT / "out" / "bench" / "steering_labels.json")
    p.add_argument("--skip-regions", action="store_true")
    p.add_argument("--regions", default=",".join(REGIONS))
    p.add_argument("--json", type=Path, default=ROOT / "out" / "bench" / "steering.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    corpus = load_communes()
    model, tok, _ = load_checkpoint(args.checkpoint)
    sae = load_sae(args.sae) if (args.sae / "cfg.json").is_file() else None
    report: dict = {"checkpoint": str(args.checkpoint), "sae": str(args.sae) if sae is not None else None, "n": args.n}

    t0 = time.perf_counter()
    cache = ROOT / "out" / "bench" / "region_classifier.safetensors"
    if args.skip_classifier:
        clf = rg.load_or_train_classifier(corpus, cache, rg.ClassifierSettings())[0]
    else:
        clf, rows, summary = classifier_section(corpus, cache)
        report["classifier"] = {"summary": summary, "rows": rows}
        print("## Region classifier (held-out test split; logistic regression over character 1-5-grams vs the floor)")
        print(format_table(rows, list(rows[0])))
        print(
            f"accuracy: test {summary['test_accuracy']:.1%} (naive Bayes {summary['test_accuracy_nb']:.1%}), "
            f"val {summary['val_accuracy']:.1%} (naive Bayes {summary['val_accuracy_nb']:.1%})\n"
        )
    labels = None
    if sae is not None:
        n_names = 2000 if args.quick else 4000
        labels = Labels(model, corpus, sae, args.sae, n_names, args.seed, args.labels_cache)
    if not args.skip_catalogue:
        if sae is None:
            print(f"## Catalogue: skipped (no SAE in {args.sae})\n")
        else:
            cat = catalogue(model, tok, corpus, sae, labels, args.n, args.seed, args.quick)
            report["catalogue"] = cat
            hook = sae.cfg.metadata.hook_name
            print(f"## Catalogue: SAE features of {args.sae.name} ({hook}), picked by their concept labels")
            print(format_table(cat, list(cat[0])))
            print("effect: Cohen's h of the property's rate (|h| 0.2 small, 0.5 medium, 0.8 large); length in chars\n")

    if not args.skip_regions:
        results = []
        for region in args.regions.split(","):
            results.append(region_steering(model, tok, corpus, sae, clf, labels, region, args.n, args.seed, args.quick))
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
