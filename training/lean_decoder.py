"""An incremental decoder over a HookedTransformer's own weights, for sampling without hooks.

TransformerLens's forward with its key-value cache spends most of a sampling step in per-step overhead: hook points,
Python-level norms, and a `torch.cat` of the whole cache at every token. Sampling 10,000 names needs the same
arithmetic with a preallocated cache and fused kernels (`F.layer_norm`, one QKV matmul), which is all this is; it is
used only when no hook is asked for, and tests check that it gives the same next-letter probabilities as the model's
ordinary forward. Configurations it does not cover (rotary, gated MLP, other norms) fall back to TransformerLens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def supports(model) -> bool:
    c = model.cfg
    return (
        c.positional_embedding_type == "standard"
        and c.normalization_type in ("LN", "RMS")
        and c.act_fn in ACTS
        and not c.gated_mlp
        and not c.attn_only
        and c.use_attn_scale
        and not c.scale_attn_by_inverse_layer_idx
        and c.n_key_value_heads is None
        and getattr(c, "attn_scores_soft_cap", -1) in (None, -1)
        and getattr(c, "output_logits_soft_cap", -1) in (None, -1)
    )


class LeanDecoder:
    def __init__(self, model, batch: int):
        c = model.cfg
        self.cfg, self.model = c, model
        self.act = ACTS[c.act_fn]
        self.n_heads, self.d_head = c.n_heads, c.d_head
        self.blocks = []
        for b in model.blocks:
            a = b.attn
            w_qkv = torch.cat([a.W_Q, a.W_K, a.W_V], dim=0)  # [3*heads, d_model, d_head]
            w_qkv = w_qkv.permute(1, 0, 2).reshape(c.d_model, -1)  # [d_model, 3*heads*d_head]
            b_qkv = torch.cat([a.b_Q, a.b_K, a.b_V], dim=0).reshape(-1)
            self.blocks.append(
                {
                    "ln1": (b.ln1.w, getattr(b.ln1, "b", None)),
                    "ln2": (b.ln2.w, getattr(b.ln2, "b", None)),
                    "qkv": (w_qkv.T.contiguous(), b_qkv),
                    "o": (a.W_O.reshape(-1, c.d_model).T.contiguous(), a.b_O),
                    "in": (b.mlp.W_in.T.contiguous(), b.mlp.b_in),
                    "out": (b.mlp.W_out.T.contiguous(), b.mlp.b_out),
                }
            )
        self.ln_f = (model.ln_final.w, getattr(model.ln_final, "b", None))
        self.unembed = (model.W_U.T.contiguous(), model.b_U)
        shape = (c.n_layers, batch, c.n_heads, c.n_ctx, c.d_head)  # positions contiguous per head: cheap slices
        self.k, self.v = torch.empty(shape), torch.empty(shape)
        self.pos = 0
        self.batch = batch
        self.scale = c.attn_scale

    def _norm(self, x, wb):
        w, b = wb
        if self.cfg.normalization_type == "LN":
            return F.layer_norm(x, (x.shape[-1],), w, b, self.cfg.eps)
        return F.rms_norm(x, (x.shape[-1],), w, self.cfg.eps)

    def keep(self, rows: Int[Tensor, " live"]) -> None:
        """Drop every row but `rows`; only the filled part of the cache is copied."""
        self.k, self.v = _take(self.k, rows, self.pos), _take(self.v, rows, self.pos)
        self.batch = len(rows)

    @torch.no_grad()
    def step(self, tokens: Int[Tensor, "batch new"]) -> Float[Tensor, "batch vocab"]:
        """Feed the next tokens of every row; return the logits after the last of them."""
        B, T = tokens.shape
        p0, p1 = self.pos, self.pos + T
        x = self.model.W_E[tokens] + self.model.W_pos[p0:p1]
        causal = None
        if T > 1:
            causal = torch.ones(T, p1, dtype=torch.bool).tril(diagonal=p0)
        for layer, blk in enumerate(self.blocks):
            h = self._norm(x, blk["ln1"])
            qkv = F.linear(h, *blk["qkv"]).view(B, T, 3, self.n_heads, self.d_head)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, d_head]
            self.k[layer, :, :, p0:p1], self.v[layer, :, :, p0:p1] = k, v
            z = F.scaled_dot_product_attention(
                q, self.k[layer, :, :, :p1], self.v[layer, :, :, :p1], attn_mask=causal, scale=1.0 / self.scale
            )  # [B, heads, T, d_head]
            x = x + F.linear(z.transpose(1, 2).reshape(B, T, -1), *blk["o"])
            h = self._norm(x, blk["ln2"])
            x = x + F.linear(self.act(F.linear(h, *blk["in"])), *blk["out"])
        self.pos = p1
        return F.linear(self._norm(x[:, -1], self.ln_f), *self.unembed)


def _take(cache: Tensor, rows: Tensor, pos: int) -> Tensor:
    out = torch.empty(cache.shape[0], len(rows), *cache.shape[2:])
    out[:, :, :, :pos] = cache[:, rows, :, :pos]
    return out
