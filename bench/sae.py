"""The SAE benchmark: architectures x sparsity on the same cached activations of a model's hook, measured on the
validation split, as a table and an L0-vs-loss-recovered frontier (plotly HTML); and the shipped SAEs.

    python bench/sae.py [--checkpoint checkpoints/transformer] [--hook H] [--grid full|quick|none] [--expansion E]
                        [--tokens T] [--threads N] [--ship] [--html out/sae_frontier.html] [--json out/sae_sweep.json]

The sweep runs at 4x expansion and 4M training samples per SAE by default (fifteen SAEs in minutes on two cores);
`--expansion 16 --tokens 8000000` sweeps at the shipped SAEs' own width and length.
--ship first trains the two shipped SAEs into checkpoints/: the default (`villes train sae`'s defaults) in sae/ and
the L1 ("standard") baseline of the same width, the reference project's method, in sae_l1/. Shipped SAEs that belong
to --checkpoint (same weights) are listed and drawn on the frontier whether or not they were trained by this run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from training.cli import format_table
from training.data import load_corpus
from training.neural import load_checkpoint
from training.sae import (
    SAESettings,
    collect_activations,
    default_hook,
    evaluate_sae,
    hook_width,
    sha256_file,
    to_inference,
    train_sae,
    train_sae_to_folder,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = SAESettings()  # the shipped default is exactly what `villes train sae` trains without flags
L1_BASELINE = SAESettings(arch="standard", l1=2.0)  # same width; its L0 lands near the TopK grid's middle
GRIDS = {
    "quick": [("topk", {"k": 4}), ("topk", {"k": 8}), ("topk", {"k": 16}), ("standard", {"l1": 2.0})],
    "full": [
        *(("topk", {"k": k}) for k in (4, 8, 16, 32)),
        *(("batchtopk", {"k": k}) for k in (4, 8, 16)),
        *(("jumprelu", {"k": k}) for k in (4, 8, 16)),
        *(("standard", {"l1": c}) for c in (0.5, 1.0, 2.0, 4.0, 8.0)),
    ],
    "none": [],
}
SWEEP = {"expansion": 4, "tokens": 4_000_000}
SHIPPED = {"sae": DEFAULT, "sae_l1": L1_BASELINE}
COLUMNS = [
    "arch",
    "sparsity",
    "d_sae",
    "L0",
    "EV",
    "recovered",
    "KL",
    "dead",
    "dense",
    "l2 ratio",
    "tok/s",
    "tok/CPU-s",
    "s",
]


def row(settings: SAESettings, d_in: int, metrics: dict, speed: dict, seconds: float) -> dict:
    sparsity = f"k={settings.sparsity_k():g}" if settings.l1 is None and settings.arch != "standard" else None
    return {
        "arch": settings.arch,
        "sparsity": sparsity or f"l1={settings.l1:g}",
        "d_sae": settings.width(d_in),
        "L0": f"{metrics['l0']:.2f}",
        "EV": f"{metrics['explained_variance']:.4f}",
        "recovered": f"{metrics['loss_recovered']:.4f}",
        "KL": f"{metrics['kl']:.4f}",
        "dead": f"{metrics['dead_fraction']:.1%}",
        "dense": f"{metrics['dense_fraction']:.1%}",
        "l2 ratio": f"{metrics['l2_ratio']:.3f}",
        "tok/s": f"{speed['tokens_per_second']:,.0f}",
        "tok/CPU-s": f"{speed['tokens_per_cpu_second']:,.0f}",
        "s": f"{seconds:.0f}",
        "_metrics": {**metrics, **speed, "settings": asdict(settings)},
    }


def speed_rows(acts: torch.Tensor, tokens: int, threads: list[int]) -> list[dict]:
    """Training speed of the issue's reference shape, a 64 -> 512 TopK (k=8) SAE, on the first 64 dimensions of the
    cached activations, with SAETrainer exactly as every SAE here is trained."""
    x = acts[:, :64].contiguous()
    rows = []
    for n in threads:
        previous = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            _, speed = train_sae(x, SAESettings(arch="topk", d_sae=512, k=8, tokens=tokens), progress=False)
        finally:
            torch.set_num_threads(previous)
        rows.append(
            {
                "SAE": "64->512 topk k=8",
                "threads": n,
                "tokens": f"{speed['train_tokens']:,}",
                "s": f"{speed['train_seconds']:.1f}",
                "tok/s": f"{speed['tokens_per_second']:,.0f}",
                "tok/CPU-s": f"{speed['tokens_per_cpu_second']:,.0f}",
            }
        )
    return rows


def shipped_rows(checkpoint: Path, d_in: int) -> list[dict]:
    """The shipped SAE folders trained on exactly this checkpoint's weights, as table rows."""
    sha = sha256_file(checkpoint / "model.safetensors")
    rows = []
    for name in SHIPPED:
        path = ROOT / "checkpoints" / name / "metrics.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text(encoding="utf-8"))
        if metrics.get("model_sha256") != sha:
            print(f"checkpoints/{name} belongs to other model weights: not listed", file=sys.stderr)
            continue
        settings = SAESettings(**metrics["settings"])
        rows.append(
            {"folder": f"checkpoints/{name}", **row(settings, d_in, metrics, metrics, metrics["train_seconds"])}
        )
    return rows


def frontier_figure(rows: list[dict], shipped: list[dict], title: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in shipped:
        fig.add_trace(
            go.Scatter(
                x=[r["_metrics"]["l0"]],
                y=[r["_metrics"]["loss_recovered"]],
                mode="markers",
                marker={"symbol": "star", "size": 16},
                hovertext=[f"{r['folder']}: {r['d_sae']} latents, EV {r['EV']}, dead {r['dead']}, KL {r['KL']}"],
                name=f"{r['folder']}: {r['arch']} {r['sparsity']}, {r['d_sae']} latents",
            )
        )
    for arch in dict.fromkeys(r["arch"] for r in rows):
        points = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["_metrics"]["l0"])
        fig.add_trace(
            go.Scatter(
                x=[r["_metrics"]["l0"] for r in points],
                y=[r["_metrics"]["loss_recovered"] for r in points],
                mode="lines+markers",
                name=f"{arch} ({points[0]['d_sae']} latents)",
                hovertext=[f"{r['sparsity']}: EV {r['EV']}, dead {r['dead']}, KL {r['KL']}" for r in points],
            )
        )
    fig.add_hline(y=0.97, line_dash="dot", annotation_text="target: recovered ≥ 0.97")
    fig.add_vline(x=8, line_dash="dot", annotation_text="L0 ≤ 8")
    # an explicit range: plotly's autorange reads a vline on a log axis as log10(x), stretching the axis to 1e8
    l0 = [r["_metrics"]["l0"] for r in [*rows, *shipped]] or [8.0]
    fig.update_layout(
        title=title,
        xaxis={
            "title": "L0 (active latents per token)",
            "type": "log",
            "range": [math.log10(min(*l0, 8) / 1.3), math.log10(max(*l0, 8) * 1.3)],
        },
        yaxis={"title": "loss recovered (validation)"},
        width=900,
        height=560,
    )
    return fig


def from_json(path: Path, d_in: int) -> list[dict]:
    """The rows of an earlier sweep (its --json file), to redraw the frontier without training again."""
    return [row(SAESettings(**m["settings"]), d_in, m, m, m["train_seconds"]) for m in json.loads(path.read_text())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "transformer")
    p.add_argument("--hook", default=None)
    p.add_argument("--tokens", type=int, default=SWEEP["tokens"], help="training samples per SAE of the sweep")
    p.add_argument("--expansion", type=int, default=SWEEP["expansion"], help="of the sweep's SAEs")
    p.add_argument("--batch-size", type=int, default=DEFAULT.batch_size)
    p.add_argument("--grid", choices=list(GRIDS), default="full")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--ship", action="store_true", help="also train checkpoints/sae and checkpoints/sae_l1")
    p.add_argument("--speed-tokens", type=int, default=4_000_000, help="for the 64->512 speed rows (0: skip them)")
    p.add_argument("--html", type=Path, default=ROOT / "out" / "sae_frontier.html")
    p.add_argument("--json", type=Path, default=ROOT / "out" / "sae_sweep.json")
    p.add_argument("--from-json", type=Path, default=None, help="redraw the frontier of an earlier sweep's --json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _, config = load_checkpoint(args.checkpoint)
    hook = args.hook or default_hook(model)
    d_in = hook_width(model, hook)
    info = config.get("corpus", {})
    corpus = load_corpus(info.get("names_file"), lowercase=info.get("lowercase", True))
    start = time.perf_counter()
    acts = collect_activations(model, corpus.split_names("train"), hook)
    print(
        f"{args.checkpoint} {hook}: {len(acts):,} train activations of width {d_in} cached in "
        f"{time.perf_counter() - start:.1f} s; torch threads {torch.get_num_threads()}",
        file=sys.stderr,
    )
    if args.speed_tokens and d_in < 64:
        print(f"speed rows skipped: the hook is {d_in} wide, under the 64 of the reference shape", file=sys.stderr)
    elif args.speed_tokens:
        speed = speed_rows(acts, args.speed_tokens, sorted({1, torch.get_num_threads()}))
        print("Training speed (SAETrainer fed from the in-memory cache; tok/CPU-s: per second of this process's CPU)")
        print(format_table(speed, list(speed[0])), flush=True)
    if args.ship:
        for name, settings in SHIPPED.items():
            train_sae_to_folder(args.checkpoint, replace(settings, hook=hook), ROOT / "checkpoints" / name, acts=acts)
    shipped = shipped_rows(args.checkpoint, d_in)
    if shipped:
        print("\nShipped SAEs (validation split)")
        print(format_table(shipped, ["folder", *COLUMNS]), flush=True)
    base = replace(DEFAULT, hook=hook, expansion=args.expansion, batch_size=args.batch_size, tokens=args.tokens)
    rows = from_json(args.from_json, d_in) if args.from_json else []
    for arch, sparsity in [] if args.from_json else GRIDS[args.grid]:
        settings = replace(base, arch=arch, **sparsity)
        start = time.perf_counter()
        training_sae, speed = train_sae(acts, settings, {"hook_name": hook}, progress=False)
        metrics = evaluate_sae(model, to_inference(training_sae), corpus.split_names("val"), hook)
        rows.append(row(settings, d_in, metrics, speed, time.perf_counter() - start))
        print(", ".join(f"{c} {rows[-1][c]}" for c in COLUMNS), file=sys.stderr, flush=True)
    if rows:
        print(
            f"\nSAEs on {hook} of {args.checkpoint} ({len(acts):,} cached train activations, "
            f"{base.tokens:,} training samples each); metrics on the validation split"
        )
        print(format_table(rows, COLUMNS))
        args.html.parent.mkdir(parents=True, exist_ok=True)
        title = f"SAE frontier on {hook} of {args.checkpoint.name}: architectures x sparsity, same activations"
        frontier_figure(rows, shipped, title).write_html(args.html)
        if not args.from_json:
            args.json.write_text(json.dumps([r["_metrics"] for r in rows], indent=1))
        print(f"frontier: {args.html}; rows: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
