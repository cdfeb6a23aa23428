"""The MLP rung (Bengio et al. 2003): letter embeddings of a fixed window of previous tokens, concatenated, through
hidden layers to next-letter logits. It maps tokens [batch, pos] -> logits [batch, pos, vocab] like the Transformer,
so evaluation, training and sampling are shared."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from training.tokenizer import BOS_ID


@dataclass(frozen=True)
class MLPSettings:
    context: int = 8  # previous tokens seen (<bos>-padded at the start of a name)
    d_embed: int = 32
    d_hidden: int = 512
    n_hidden: int = 2
    dropout: float = 0.2
    d_vocab: int = 0  # set from the tokenizer
    seed: int = 0


class MLP(nn.Module):
    def __init__(self, s: MLPSettings):
        super().__init__()
        torch.manual_seed(s.seed)
        self.settings = s
        self.embed = nn.Embedding(s.d_vocab, s.d_embed)
        layers: list[nn.Module] = []
        width = s.context * s.d_embed
        for _ in range(s.n_hidden):
            layers += [nn.Linear(width, s.d_hidden), nn.GELU(), nn.Dropout(s.dropout)]
            width = s.d_hidden
        self.hidden = nn.Sequential(*layers)
        self.unembed = nn.Linear(width, s.d_vocab)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        k = self.settings.context
        padded = F.pad(tokens, (k - 1, 0), value=BOS_ID)
        windows = padded.unfold(1, k, 1)  # [batch, pos, k]: tokens pos-k+1 .. pos
        x = self.embed(windows).flatten(-2)
        return self.unembed(self.hidden(x))
