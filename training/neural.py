"""Checkpoint folders of the neural rungs (MLP, Transformer): one layout, loadable with no flags.

config.json                     kind, model settings, training settings, corpus, metrics
hooked_transformer_config.json  (transformer) HookedTransformerConfig(**this) rebuilds the architecture
model.safetensors               the best weights on validation (the moving average when training used one)
tokenizer/                      Hugging Face tokenizer folder (+ chars.json)
state.json, state-<step>/       resume state while training; removed when training completes
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import torch

from training import checkpoint as ckpt
from training.data import Corpus
from training.errors import VillesError
from training.lm import TrainSettings, train_lm
from training.mlp import MLP, MLPSettings
from training.tokenizer import CharTokenizer
from training.transformer import TransformerSettings, add_dropout_hooks, build_model, remove_dropout_hooks

FORMAT = "villes-checkpoint-1"


def _settings(cls, d: dict):
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise VillesError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    return cls(**d)


def _build(kind: str, model_settings: dict, tokenizer: CharTokenizer, tokenizer_dir: Path | None):
    if kind == "transformer":
        s = _settings(TransformerSettings, model_settings)
        hooked = s.hooked_config(tokenizer.vocab_size)
        return build_model(hooked, tokenizer_dir), hooked
    if kind == "mlp":
        s = _settings(MLPSettings, {**model_settings, "d_vocab": tokenizer.vocab_size})
        return MLP(s), None
    raise VillesError(f"unknown model kind {kind!r}")


def load_checkpoint(folder: Path | str) -> tuple[torch.nn.Module, CharTokenizer, dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise VillesError(f"checkpoint folder not found: {folder}")
    config = ckpt.read_json(folder / "config.json")
    if config.get("format") != FORMAT:
        raise VillesError(f"{folder} is not a villes model checkpoint (config.json has no format {FORMAT!r})")
    tokenizer = CharTokenizer.load(folder / "tokenizer")
    if config["kind"] == "transformer":
        hooked = ckpt.read_json(folder / "hooked_transformer_config.json")
        if hooked.get("d_vocab") != tokenizer.vocab_size:
            raise VillesError(f"{folder}: config d_vocab {hooked.get('d_vocab')} != tokenizer's {tokenizer.vocab_size}")
        try:
            model = build_model(hooked, folder / "tokenizer")
        except (TypeError, ValueError, AssertionError) as e:
            raise VillesError(f"{folder}: bad hooked_transformer_config.json ({e})") from None
    else:
        model, _ = _build(config["kind"], config["model"], tokenizer, None)
    ckpt.load_state_dict_strict(model, ckpt.load_tensors(folder / "model.safetensors"), folder / "model.safetensors")
    model.eval()
    return model, tokenizer, config


def _corpus_info(corpus: Corpus) -> dict:
    return {
        "source": corpus.source,
        "names_file": corpus.names_file,
        "lowercase": corpus.lowercase,
        **{s: len(corpus.split(s)) for s in ("train", "val", "test")},
    }


def train_to_folder(
    kind: str,
    model_settings: dict,
    train_settings: TrainSettings,
    corpus: Corpus,
    out: Path | str,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train a neural rung on corpus's train split, early-stopping on its val split, into checkpoint folder `out`.
    With resume, settings come from the folder and training continues from its last state."""
    out = Path(out)
    if resume:
        config = ckpt.read_json(out / "config.json")
        if config.get("format") != FORMAT:
            raise VillesError(f"{out} is not a villes model checkpoint")
        kind, model_settings = config["kind"], config["model"]
        train_settings = _settings(TrainSettings, config["training"])
        tokenizer = CharTokenizer.load(out / "tokenizer")
        if config.get("metrics", {}).get("complete"):
            return config["metrics"]
    else:
        if (out / "config.json").exists():
            raise VillesError(f"{out} already holds a checkpoint: use --resume, or choose another --out")
        tokenizer = CharTokenizer.from_names(corpus.names)
        if kind == "transformer":
            model_settings = {**model_settings, "n_ctx": max(map(len, corpus.names)) + 2}
        tokenizer.save(out / "tokenizer")
    for split in ("train", "val"):  # fail before training on a character the vocabulary lacks
        for name in corpus.split_names(split):
            tokenizer.encode(name)
    model, hooked = _build(kind, model_settings, tokenizer, out / "tokenizer")
    config = {
        "format": FORMAT,
        "kind": kind,
        "model": model_settings,
        "training": asdict(train_settings),
        "corpus": _corpus_info(corpus),
        "metrics": {"complete": False},
    }
    if not resume:
        if hooked is not None:
            ckpt.atomic_write_json(out / "hooked_transformer_config.json", hooked)
        ckpt.atomic_write_json(out / "config.json", config)

    def save_best(weights: dict, metrics: dict) -> None:
        ckpt.atomic_save_tensors(weights, out / "model.safetensors")
        ckpt.atomic_write_json(out / "config.json", {**config, "metrics": {**metrics, "complete": False}})

    if kind == "transformer":
        add_dropout_hooks(model, train_settings.dropout)
    else:
        model.set_dropout(train_settings.dropout)
    try:
        result = train_lm(
            model,
            tokenizer,
            corpus.split_names("train"),
            corpus.split_names("val"),
            train_settings,
            save_best,
            out,
            progress,
        )
    finally:
        if kind == "transformer":
            remove_dropout_hooks(model)
    best, _, _ = load_checkpoint(out)
    from training.lm import evaluate_nll

    train_sum, train_n = evaluate_nll(best, tokenizer, corpus.split_names("train"))
    metrics = {
        **ckpt.read_json(out / "config.json")["metrics"],
        **{k: v for k, v in result.items() if k != "history"},
        "train_nll": train_sum / train_n,
        "val_nll": result["best_val_nll"],
        "params": sum(p.numel() for p in best.parameters()),
        "history": result["history"],
        "complete": True,
    }
    ckpt.atomic_write_json(out / "config.json", {**config, "metrics": metrics})
    ckpt.clear_state(out)
    return metrics
