"""The Transformer benchmark: quality of the shipped default on both corpora, training speed at the reference shape,
sampling speed, novelty and samples.

    python bench/transformer.py [--checkpoint checkpoints/transformer] [--villes-run runs/villes-txt] [--skip-villes]

The same-data comparison trains the shipped default's settings on the reference project's villes.txt (split by
distinct name, as ours) end to end into --villes-run; the run is resumable, and a finished run is only evaluated.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from training.cli import format_table
from training.data import load_communes, load_names_file
from training.ladder import novelty
from training.lm import TrainSettings, evaluate_nll, make_optimizer, mean_nll
from training.neural import load_checkpoint, train_to_folder
from training.sampling import SampleSettings, sample_names
from training.tokenizer import CharTokenizer
from training.transformer import TransformerSettings, build_model

ROOT = Path(__file__).resolve().parent.parent
VILLES = ROOT.parent / "shared" / "anchors" / "villes.txt"


def quality(folder: Path, corpus) -> dict:
    model, tok, config = load_checkpoint(folder)
    row = {"corpus": corpus.source, "params": sum(p.numel() for p in model.parameters())}
    for split in ("train", "val", "test"):
        total, n = evaluate_nll(model, tok, corpus.split_names(split))
        row[f"{split} NLL"] = f"{total / n:.4f}"
    row["steps"] = config["metrics"].get("steps")
    return row


def training_speed(tok: CharTokenizer, corpus, steps: int = 60) -> dict:
    """ms per step at the reference shape: 1 layer, d_model 64, 8 heads, batches of 64 names."""
    folder = ROOT / "out" / "bench-tokenizer"
    tok.save(folder)
    model = build_model(TransformerSettings(n_layers=1, d_model=64, n_heads=8).hooked_config(tok.vocab_size), folder)
    model.train()
    opt = make_optimizer(model, TrainSettings())
    data = tok.batch(corpus.split_names("train"))
    gen = torch.Generator().manual_seed(0)
    times, tokens = [], 0
    for i in range(steps + 10):
        idx = torch.randint(len(data), (64,), generator=gen)
        batch = data[idx, : int((data[idx] != 0).sum(1).max())]
        t = time.perf_counter()
        loss = mean_nll(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 10:  # warm-up steps excluded
            times.append(time.perf_counter() - t)
            tokens += int((batch[:, 1:] != 0).sum())
    ms = 1000 * sum(times) / len(times)
    return {
        "shape": "1 layer, d_model 64, 8 heads, 64 names",
        "ms/step": f"{ms:.1f}",
        "tokens/s": f"{tokens / sum(times):,.0f}",
        "reference ms/step": "25",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "transformer")
    p.add_argument("--villes", type=Path, default=VILLES)
    p.add_argument("--villes-run", type=Path, default=ROOT / "runs" / "villes-txt")
    p.add_argument("--skip-villes", action="store_true", help="skip training on villes.txt")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    corpus = load_communes()
    model, tok, config = load_checkpoint(args.checkpoint)

    rows = [quality(args.checkpoint, corpus)]
    if not args.skip_villes and args.villes.exists():
        villes = load_names_file(args.villes)
        settings = TrainSettings(**config["training"])
        shape = {k: v for k, v in config["model"].items() if k != "n_ctx"}
        resume = (args.villes_run / "config.json").exists()
        train_to_folder("transformer", shape, settings, villes, args.villes_run, resume=resume)
        rows.append(quality(args.villes_run, villes))
    print("## Quality (nats per predicted character, <eos> included)\n")
    print(format_table(rows, list(rows[0])))
    print(
        "\nreference: villes.txt distinct-name split 1.705 (1 layer d64), 1.616 (2 layers d128, cosine); "
        "random line split 1.675"
    )

    print("\n## Training speed\n")
    speed = training_speed(tok, corpus)
    print(format_table([speed], list(speed)))

    print("\n## Sampling\n")
    timings = []
    for _ in range(3):
        t = time.perf_counter()
        samples = sample_names(model, tok, SampleSettings(n=10_000, seed=len(timings))).names
        timings.append(time.perf_counter() - t)
    hooked = time.perf_counter()
    sample_names(model, tok, SampleSettings(n=10_000, seed=0), fwd_hooks=[("hook_embed", lambda x, hook: x)])
    hooked = time.perf_counter() - hooked
    table = [
        {"what": "10,000 names, lean decoder (best of 3)", "seconds": f"{min(timings):.2f}"},
        {"what": "10,000 names, TransformerLens forward + KV cache (hooks on)", "seconds": f"{hooked:.2f}"},
    ]
    print(format_table(table, ["what", "seconds"]))
    mean_len = lambda names: sum(map(len, names)) / len(names)  # noqa: E731
    print(
        f"\nnovelty (10,000 samples, T=1): {novelty(samples, corpus):.1%}; "
        f"mean length {mean_len(samples):.1f} (corpus {mean_len(corpus.names):.1f})"
    )
    for label, s in (
        ("T=0.8", SampleSettings(n=10, seed=0, temperature=0.8)),
        ("T=1.0", SampleSettings(n=10, seed=0)),
        ("prefix saint-", SampleSettings(n=10, seed=0, prefix="saint-")),
    ):
        names = sample_names(model, tok, s).names
        print(f"{label}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
