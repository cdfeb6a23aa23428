"""`villes demo`: the main job on the shipped checkpoints, no training. Each stage writes under `out/` and adds a
section to `out/index.html`; the terminal gets a short text summary."""

from __future__ import annotations

import dataclasses
import html
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from training.checkpoint import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from torch import Tensor


def ladder_stage(out: Path, progress: bool) -> tuple[str, str]:
    from training.cli import format_table
    from training.data import load_communes
    from training.ladder import ladder

    rows, notes = ladder(load_communes(), progress=progress)
    atomic_write_json(out / "ladder.json", [dataclasses.asdict(r) for r in rows])
    table = [r.display() for r in rows]
    text = format_table(table, list(table[0])) + "".join(f"\n{n}" for n in notes)
    return text, f"<h2>The ladder</h2><pre>{html.escape(text)}</pre><p><a href='ladder.json'>ladder.json</a></p>"


STAGES = {"ladder": ladder_stage}


def run_demo(out: Path | str = "out", progress: bool = True) -> str:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts, sections, timings = [], [], {}
    for name, stage in STAGES.items():
        t = time.perf_counter()
        text, section = stage(out, progress)
        timings[name] = round(time.perf_counter() - t, 1)
        texts.append(text)
        sections.append(section)
    page = (
        "<!doctype html><meta charset='utf-8'><title>villes demo</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:80em;margin:2em auto}pre{font-size:13px}</style>"
        "<h1>villes: French commune names, generated and opened</h1>" + "".join(sections)
    )
    atomic_write_text(out / "index.html", page)
    atomic_write_json(out / "timings.json", timings)
    return "\n\n".join(texts) + f"\n\nwritten: {out / 'index.html'} ({json.dumps(timings)} s)"


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
