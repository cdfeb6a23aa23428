"""The monosemanticity benchmark: every unit of the shipped model and SAE (SAE features, MLP neurons, residual basis
±) and the controls (random directions, top-k neurons, an SAE of the same settings on the randomly initialised model)
against the whole concept bank on the full corpus; the summary table, the best unit of each kind, and the time.

    python bench/monosemanticity.py [--checkpoint checkpoints/transformer] [--sae checkpoints/sae]
                                    [--control-sae out/bench-monosemanticity/control_sae] [--out DIR] [--threads N]

Target: the shipped model's and SAE's units (SAE features, neurons, residual basis ±) against the whole bank on the
full corpus, everything included (bank, forward pass, SAE encoding, scores), in <= 60 s; the controls are timed apart
(their forward pass through the random model, their units and scores; training the control SAE is not timed: it is
trained once into --control-sae and reused). Wall time depends on what else runs on the machine, so the CPU time and
the load average are printed beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from interp.monosemanticity import (
    CONTROL_KINDS,
    format_summary,
    load_or_train_control_sae,
    monosemanticity,
    write_report,
)
from training.checkpoint import read_json
from training.cli import format_table
from training.data import load_corpus
from training.sae import load_sae
from training.transformer import load_model

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 60.0


def best_units(rows: list[dict]) -> list[dict]:
    """The highest-Mono1 unflagged unit of each kind and hook (the showcase units, not the population)."""
    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["flags"] or r["mono1"] is None:
            continue
        key = (r["kind"], r["hook"])
        if key not in best or r["mono1"] > best[key]["mono1"]:
            best[key] = r
    return [
        {
            "kind": ("(control) " if k[0] in CONTROL_KINDS else "") + k[0],
            "hook": k[1],
            "unit": r["unit"],
            "concept": r["concept"],
            "theta": r["theta"],
            "Mono1": f"{r['mono1']:.3f}",
            "Mono2": "-" if r["mono2"] is None else f"{r['mono2']:.3f}",
            "r": f"{r['r']:.3f}",
            "density": f"{r['density']:.4f}",
        }
        for k, r in best.items()
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "transformer")
    p.add_argument("--sae", type=Path, default=ROOT / "checkpoints" / "sae")
    p.add_argument("--control-sae", type=Path, default=ROOT / "out" / "bench-monosemanticity" / "control_sae")
    p.add_argument("--control-tokens", type=int, default=None, help="(default: the SAE's own)")
    p.add_argument("--out", type=Path, default=None, help="also write the report (CSV/JSON/figures) here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: with other jobs on the machine, "
                   "a second thread mostly spins)")  # fmt: skip
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.checkpoint)
    sae = load_sae(args.sae, args.checkpoint)
    info = read_json(args.checkpoint / "config.json").get("corpus", {})
    corpus = load_corpus(info.get("names_file"), lowercase=info.get("lowercase", True))
    communes = corpus.split("all")

    t = time.perf_counter()
    control, trained = load_or_train_control_sae(
        model, sae, corpus.split_names("train"), args.control_sae, args.control_tokens, progress=True
    )
    print(f"control SAE {'trained' if trained else 'reused'} ({args.control_sae}): {time.perf_counter() - t:.1f} s",
          file=sys.stderr)  # fmt: skip

    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    report = monosemanticity(
        model, sae, [c.name for c in communes], [c.region for c in communes], control_sae=control, progress=True
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if args.out:
        write_report(report, args.out)

    i = report.info
    print(f"\n{args.checkpoint} + {args.sae} ({sae.cfg.architecture()} {sae.cfg.d_in}->{sae.cfg.d_sae} on {i['hook']}, "
          f"L0 {i['sae_l0']:.1f}); {i['names']} names, {i['positions']} positions, {i['concepts']} position concepts "
          f"+ {i['name_concepts']} name concepts\n")  # fmt: skip
    print(format_summary(report.summary))
    print("\nbest unflagged unit of each kind (a showcase, not the population):\n")
    print(format_table(best_units(report.rows), ["kind", "hook", "unit", "concept", "theta", "Mono1", "Mono2", "r",
                                                 "density"]))  # fmt: skip
    stages = [{"stage": k, "wall s": f"{v:.1f}", "CPU s": f"{i['cpu_s'][k]:.1f}"} for k, v in i["wall_s"].items()]
    stages += [
        {"stage": f"  scoring {k}", "wall s": f"{v['wall_s']:.1f}", "CPU s": f"{v['cpu_s']:.1f}"}
        for k, v in i["scoring_by_kind"].items()
    ]
    main_kinds = [k for k in i["scoring_by_kind"] if k.split()[0] not in CONTROL_KINDS]
    main = [
        sum(i[key][k] for k in ("bank", "activations", "units")) + sum(i["scoring_by_kind"][k][key] for k in main_kinds)
        for key in ("wall_s", "cpu_s")
    ]
    stages.append({"stage": "shipped model + SAE units (no controls)", "wall s": f"{main[0]:.1f}",
                   "CPU s": f"{main[1]:.1f}"})  # fmt: skip
    stages.append({"stage": "total (with controls)", "wall s": f"{wall:.1f}", "CPU s": f"{cpu:.1f}"})
    print(f"\ntime ({torch.get_num_threads()} torch threads, load average {load:.1f} on {os.cpu_count()} CPUs "
          f"at the start):\n")  # fmt: skip
    print(format_table(stages, ["stage", "wall s", "CPU s"]))
    verdict = "meets" if main[0] <= TARGET_S else "misses"
    n_main = sum(1 for r in report.rows if r["kind"] not in CONTROL_KINDS)
    print(f"\nthe shipped model's and SAE's {n_main} units: {main[0]:.1f} s wall, {main[1]:.1f} s CPU ({verdict} the "
          f"{TARGET_S:.0f} s target in wall time, {'meets' if main[1] <= TARGET_S else 'misses'} it in CPU time); "
          f"with the controls, {len(report.rows)} units: {wall:.1f} s wall, {cpu:.1f} s CPU")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
