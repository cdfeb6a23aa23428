"""The attribution benchmark: how faithful each method is to exact ablation, over (name, position) pairs of the
validation split, and how fast one name is attributed.

    python bench/attribution.py [--checkpoint checkpoints/transformer] [--sae checkpoints/sae] [--pairs 200]
                                [--kind logprob|logit] [--baseline mean|zero] [--seed 0] [--json FILE]

Pairs: names drawn from the validation split, a position drawn uniformly in 1..len(name) (the prediction of a
character after at least one, or of the end; position 0, the first character after <bos>, is the same prediction
for every name and sits where the SAEs are not trained). Per pair and SAE: Spearman of each method against exact
ablation over the active features, the error share, and the keep-top-k curve (the k features a method ranks highest
kept, the other active ones at the baseline, error kept: the fraction of T(clean) − T(all at baseline) recovered).
Issue #8's floors: median Spearman(direct or gxa, ablation) >= 0.9, top-5 features recover >= 80% of the change,
one 20-character name at every position with direct + gxa + ablation in <= 200 ms.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from interp.attribution import Target, attribute, default_methods, feature_means  # noqa: E402
from training.cli import format_table  # noqa: E402
from training.data import load_corpus  # noqa: E402
from training.neural import load_checkpoint  # noqa: E402
from training.sae import load_sae  # noqa: E402

FLOOR_SPEARMAN, FLOOR_TOP5, FLOOR_MS = 0.9, 0.8, 200.0
KS = (1, 2, 3, 5, 10, 20)


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def _quartiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(x for x in xs if x == x)
    if len(xs) < 2:
        return float("nan"), float("nan")
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def _at(curve: list[list[float]], k: int) -> float:
    """Recovery keeping k features (all of them when fewer are active)."""
    for kk, value in curve:
        if kk >= k:
            return value if value is not None else float("nan")
    value = curve[-1][1] if curve else None  # k beyond the active features: all kept
    return value if value is not None else float("nan")


def pairs_from(names: list[str], n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    chosen = rng.sample(names, min(n, len(names)))
    return [(name, rng.randint(1, len(name))) for name in chosen]


def faithfulness(model, saes, tok, pairs, target_kind, baseline, means, methods, ig_steps, progress=True):
    """Per SAE: lists of per-pair Spearman, error share, curve values, IG gaps; closures."""
    per: dict[str, dict] = {}
    closures, probs = [], []
    start = time.perf_counter()
    for i, (name, position) in enumerate(pairs):
        r = attribute(
            model,
            saes,
            name,
            position=position,
            target=Target(kind=target_kind),
            methods=methods,
            tokenizer=tok,
            baseline=baseline,
            means=means,
            ig_steps=ig_steps,
            graph=False,
        )
        pred = r[position]
        probs.append(dict(pred.top).get(pred.symbol, 0.0))
        if pred.closure is not None:
            closures.append(pred.closure)
        gaps = {c["sae"]: abs(c["gap"]) / max(abs(c["change"]), 1e-6) for c in pred.completeness or []}
        for sae, f in pred.faithfulness.items():
            d = per.setdefault(sae, {"spearman": {}, "error_share": {}, "curve": {}, "ig_gap": [], "n_features": []})
            d["n_features"].append(f["n_features"])
            for m, v in f["spearman"].items():
                d["spearman"].setdefault(m, []).append(v)
            for m, v in f["error_share"].items():
                d["error_share"].setdefault(m, []).append(v)
            for m, curve in f["keep_top_k"].items():
                d["curve"].setdefault(m, []).append(curve)
            if sae in gaps:
                d["ig_gap"].append(gaps[sae])
        if progress and (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(pairs)} pairs, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return per, closures, probs


def tables(per: dict, closures: list[float], probs: list[float]) -> str:
    out = []
    confident = [p >= 0.9 for p in probs]
    for sae, d in per.items():
        out.append(f"## {sae}  ({len(d['n_features'])} pairs, median {_median(d['n_features']):.0f} active features)")
        rows = []
        for m, vals in d["spearman"].items():
            lo, hi = _quartiles(vals)
            valid = [v for v in vals if v == v]
            if not valid:  # e.g. direct for an SAE before the last residual stream
                continue
            unsure = [v for v, c in zip(vals, confident, strict=True) if not c]
            rows.append(
                {
                    "method": m,
                    "median Spearman": f"{_median(vals):.3f}",
                    "IQR": f"{lo:.2f}..{hi:.2f}",
                    ">= 0.9": f"{sum(v >= 0.9 for v in valid) / max(len(valid), 1):.0%}",
                    "median (p<0.9)": f"{_median(unsure):.3f}",
                    "n": str(len(valid)),
                }
            )
        out.append("Spearman vs exact ablation over the active features\n")
        out.append(format_table(rows, ["method", "median Spearman", "IQR", ">= 0.9", "median (p<0.9)", "n"]))
        rows = [
            {"method": m, "median error share": f"{_median(v):.3f}", "mean": f"{statistics.fmean(_finite(v)):.3f}"}
            for m, v in d["error_share"].items()
            if _finite(v)
        ]
        out.append("\nError share: |error node| / (|error node| + sum |features|)\n")
        out.append(format_table(rows, ["method", "median error share", "mean"]))
        rows = []
        for m, curves in d["curve"].items():
            row = {"ranked by": m}
            for k in KS:
                row[f"k={k}"] = f"{_median([_at(c, k) for c in curves]):.0%}"
            rows.append(row)
        out.append("\nKeep top-k: median fraction of the change recovered (others at the baseline, error kept)\n")
        out.append(format_table(rows, ["ranked by", *(f"k={k}" for k in KS)]))
        if d["ig_gap"]:
            out.append(
                f"\nIG completeness: median |gap|/|change| {_median(d['ig_gap']):.1e}, "
                f"90th percentile {sorted(d['ig_gap'])[int(0.9 * (len(d['ig_gap']) - 1))]:.1e}"
            )
        out.append("")
    if closures:
        out.append(f"Direct closure: max |sum of terms - target| over {len(closures)} pairs = {max(closures):.1e}")
    out.append(f"Predictions with p(target) >= 0.9: {sum(confident)}/{len(probs)}")
    return "\n".join(out)


def _nanmax(xs) -> float:
    xs = [x for x in xs if x == x]
    return max(xs) if xs else float("nan")


def _finite(xs):
    return [x for x in xs if x == x]


def speed(model, saes, tok, name: str, repeats: int = 20) -> dict:
    """One name, every position, direct + gxa + ablation (no faithfulness run, no IG)."""
    methods = [m for m in ("direct", "gxa", "ablation") if m != "direct" or "direct" in default_methods(model, saes)]
    run = lambda: attribute(model, saes, name, methods=methods, tokenizer=tok, faithfulness=False, graph=False)  # noqa: E731
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - t))
    return {
        "name": name,
        "positions": len(name) + 1,
        "methods": methods,
        "ms_median": statistics.median(times),
        "ms_min": min(times),
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "transformer")
    p.add_argument("--sae", type=Path, action="append", default=None, help="repeat for several hooks")
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--kind", choices=["logprob", "logit"], default="logprob")
    p.add_argument("--baseline", choices=["mean", "zero"], default="mean")
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mean-names", type=int, default=2000, help="train names behind the mean baseline")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared machine)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    torch.set_num_threads(args.threads)
    model, tok, config = load_checkpoint(args.checkpoint)
    saes = [load_sae(f, trained_on=args.checkpoint) for f in (args.sae or [ROOT / "checkpoints" / "sae"])]
    info = config.get("corpus", {})
    corpus = load_corpus(info.get("names_file"), lowercase=info.get("lowercase", True))
    means = None
    if args.baseline == "mean":
        train = corpus.split_names("train")
        means = feature_means(model, saes, random.Random(args.seed).sample(train, min(args.mean_names, len(train))))
    pairs = pairs_from(corpus.split_names("val"), args.pairs, args.seed)
    methods = default_methods(model, saes)
    print(
        f"attribution benchmark: {args.checkpoint} · SAE {', '.join(map(str, args.sae or ['checkpoints/sae']))} · "
        f"{len(pairs)} val pairs (seed {args.seed}) · target {args.kind} · baseline {args.baseline} · "
        f"IG {args.ig_steps} steps · torch threads {torch.get_num_threads()}\n"
    )
    start = time.perf_counter()
    per, closures, probs = faithfulness(
        model, saes, tok, pairs, args.kind, args.baseline, means, methods, args.ig_steps
    )
    print(tables(per, closures, probs))
    print(f"({time.perf_counter() - start:.0f} s for the pairs)\n")
    result = {"pairs": len(pairs), "kind": args.kind, "baseline": args.baseline, "per_sae": per}
    verdicts = []
    for sae, d in per.items():
        meds = {m: _median(d["spearman"].get(m, [])) for m in ("direct", "gxa", "atp") if m in d["spearman"]}
        top5 = {m: _median([_at(c, 5) for c in d["curve"].get(m, [])]) for m in ("direct", "gxa", "atp")}
        best = _nanmax(meds.get(m, float("nan")) for m in ("direct", "gxa"))
        best5 = _nanmax(top5.get(m, float("nan")) for m in ("direct", "gxa"))
        meds = {m: v for m, v in meds.items() if v == v}
        verdicts.append(
            f"{sae}: median Spearman vs ablation "
            + " · ".join(f"{m} {v:.3f}" for m, v in meds.items())
            + f" (floor {FLOOR_SPEARMAN} on direct or gxa: {'ok' if best >= FLOOR_SPEARMAN else 'BELOW'}) · top-5 "
            f"recover {best5:.0%} (floor {FLOOR_TOP5:.0%}: {'ok' if best5 >= FLOOR_TOP5 else 'BELOW'})"
        )
    if not args.skip_speed:
        val = corpus.split_names("val")
        name = next((n for n in val if len(n) == 20), max(val, key=len)[:20])
        s = speed(model, saes, tok, name)
        result["speed"] = s
        verdicts.append(
            f"speed: {s['name']!r}, {s['positions']} positions, {' + '.join(s['methods'])}: median "
            f"{s['ms_median']:.0f} ms, min {s['ms_min']:.0f} ms over 20 runs, {s['threads']} thread(s) "
            f"(target {FLOOR_MS:.0f} ms: {'ok' if s['ms_median'] <= FLOOR_MS else 'OVER'})"
        )
    print("\n".join(verdicts))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
