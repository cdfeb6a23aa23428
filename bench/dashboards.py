"""Speed of `villes dashboards`: every feature of the SAE and every MLP neuron over the full default corpus.

    python bench/dashboards.py [--checkpoint checkpoints/transformer] [--sae checkpoints/sae] [--out DIR]

Prints one row per stage (wall-clock and CPU seconds; the indented rows sum the causal-panel tasks over the worker
threads), then units (features + neurons) per second, tokens x units per second, and the machine's load average
(1 min) before and after: the speed target (<= 60 s) assumes an otherwise idle machine; on a busy one the wall-clock
figure mostly measures the other jobs, and the CPU seconds are the steadier (if still inflated) figure.

Without an SAE folder (none given and none shipped) it times a stand-in: a seeded random TopK SAE (8 x d_model
latents, k = 8) on the last residual stream, whose latents are as sparse as a trained one's (exactly k per token), so
the work per feature is the same.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from interp.dashboards import DEFAULT_MODEL, DEFAULT_SAE, auto_threads, dashboards  # noqa: E402
from training.cli import format_table  # noqa: E402
from training.data import load_corpus  # noqa: E402
from training.neural import load_checkpoint  # noqa: E402
from training.sae import load_sae  # noqa: E402


def stand_in_sae(model, seed: int = 0):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    d = model.cfg.d_model
    return TopKSAE(TopKSAEConfig(d_in=d, d_sae=8 * d, k=8, metadata=SAEMetadata(hook_name=hook)))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--sae", type=Path, default=None, help=f"SAE folder (default {DEFAULT_SAE} if present)")
    p.add_argument("--out", type=Path, default=None, help="dashboards folder (default: a temporary one)")
    p.add_argument("--split", default="all")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: auto_threads(), as the command)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or auto_threads())
    model, tok, config = load_checkpoint(args.checkpoint)
    sae_path = args.sae or (DEFAULT_SAE if DEFAULT_SAE.is_dir() else None)
    sae = load_sae(sae_path, trained_on=args.checkpoint) if sae_path else stand_in_sae(model)
    sae_name = str(sae_path) if sae_path else f"stand-in TopK {sae.cfg.d_in}->{sae.cfg.d_sae}, k=8 (random)"
    info = config.get("corpus", {})
    communes = load_corpus(info.get("names_file"), lowercase=info.get("lowercase", True)).split(args.split)
    names, regions = [c.name for c in communes], [c.region for c in communes]
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="villes-bench-dash-")
        out = Path(tmp.name) / "dash"
    load_before = os.getloadavg()[0]
    c0, t0 = cpu_seconds(), time.perf_counter()
    result = dashboards(model, sae, out=out, neurons=True, names=names, regions=regions, tokenizer=tok, progress=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    units = sum(len(st) for st in result.store.stats.values())
    n_tokens = next(iter(result.store.stats.values())).n_tokens
    size = sum(f.stat().st_size for f in (out / "units").rglob("*.html"))
    sets = ", ".join(f"{k} {len(v)}" for k, v in result.store.stats.items())
    print(f"model {args.checkpoint} ({sum(p.numel() for p in model.parameters())} params); SAE {sae_name}")
    print(f"{len(names)} names, {n_tokens} characters; {units} units ({sets}); torch threads {torch.get_num_threads()}")
    rows = [
        {"stage": r["stage"], "wall_s": f"{r['wall_s']:.1f}", "cpu_s": f"{r['cpu_s']:.1f}"}
        for r in result.clock.table()
    ]
    rows.append({"stage": "total", "wall_s": f"{wall:.1f}", "cpu_s": f"{cpu:.1f}"})
    print(format_table(rows, ["stage", "wall_s", "cpu_s"]))
    summary = {
        "wall s": f"{wall:.1f}",
        "units/s": f"{units / wall:.1f}",  # units = features + neurons
        "tokens x units/s": f"{n_tokens * units / wall:.3g}",
        "units/cpu-s": f"{units / cpu:.1f}",
        "pages": result.pages,
        "MB of pages": f"{size / 1e6:.1f}",
        "kB/page": f"{size / 1e3 / max(result.pages, 1):.1f}",
        "load before/after": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
    }
    print(format_table([summary], list(summary)))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
