"""The top rung: a HookedTransformer built from a settings dataclass (no download), with the char tokenizer attached.

Dropout: HookedTransformer has none, so training adds it through permanent hooks that act only while
`model.training` is true (embedding sum, attention pattern, each attention and MLP output); they are removed when
training ends, so a loaded model has no trace of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig

from training.errors import VillesError
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, CharTokenizer


@dataclass(frozen=True)
class TransformerSettings:
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 8
    d_mlp: int | None = None  # None: 4 * d_model
    act_fn: str = "gelu"  # any TransformerLens activation: gelu, relu, silu (with gated_mlp: SwiGLU), ...
    gated_mlp: bool = False
    normalization: str = "LN"  # LN, RMS (TransformerLens normalization_type)
    positional: str = "standard"  # standard (learned), rotary
    n_ctx: int = 48  # longest name + <bos> + <eos>, set from the corpus at training time
    seed: int = 0

    def hooked_config(self, d_vocab: int) -> dict:
        """Keyword arguments of HookedTransformerConfig: the JSON shipped beside the weights."""
        if self.d_model % self.n_heads:
            raise VillesError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        return {
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "d_head": self.d_model // self.n_heads,
            "d_mlp": self.d_mlp or 4 * self.d_model,
            "d_vocab": d_vocab,
            "n_ctx": self.n_ctx,
            "act_fn": self.act_fn,
            "gated_mlp": self.gated_mlp,
            "normalization_type": self.normalization,
            "positional_embedding_type": self.positional,
            "default_prepend_bos": True,
            "tokenizer_prepends_bos": False,
            "seed": self.seed,
            "model_name": "villes",
            "original_architecture": "villes",
        }


def build_model(config: dict, tokenizer_dir: Path | str | None) -> HookedTransformer:
    """HookedTransformer from HookedTransformerConfig kwargs; the tokenizer is loaded from its folder so that it
    carries a name_or_path (TransformerLens reloads it from there)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
        cfg = HookedTransformerConfig(**config)
        hf = None
        if tokenizer_dir is not None:
            from transformers import PreTrainedTokenizerFast

            hf = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
        model = HookedTransformer(cfg, tokenizer=hf, move_to_device=False)
    model.eval()
    return model


def add_dropout_hooks(model: HookedTransformer, p: float) -> None:
    if p <= 0:
        return

    def drop(x, hook):
        return F.dropout(x, p, training=model.training)

    names = ["blocks.0.hook_resid_pre"]
    for layer in range(model.cfg.n_layers):
        names += [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    for name in names:
        model.add_hook(name, drop, is_permanent=True)


def remove_dropout_hooks(model: HookedTransformer) -> None:
    model.reset_hooks(including_permanent=True)


def load_model(folder: Path | str) -> HookedTransformer:
    """The Transformer of a checkpoint folder, tokenizer attached, in eval mode. Weights from safetensors only."""
    from training.neural import load_checkpoint

    model, _, config = load_checkpoint(folder)
    if config["kind"] != "transformer":
        raise VillesError(f"{folder} holds a {config['kind']} model, not a transformer")
    return model


__all__ = ["TransformerSettings", "build_model", "load_model", "BOS_ID", "EOS_ID", "PAD_ID", "CharTokenizer"]
