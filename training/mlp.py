"""The MLP rung (Bengio et al. 2003): letter embeddings of a fixed window of previous tokens, concatenated, through
hidden layers to next-letter logits. It maps tokens [batch, pos] -> logits [batch, pos, vocab] like the Transformer,
so evaluation, training and sampling are shared."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from training.tokenizer import BOS_ID, PAD_ID


@dataclass(frozen=True)
class MLPSettings:
    context: int = 8  # previous tokens seen (<bos>-padded at the start of a name)
    d_embed: int = 24
    d_hidden: int = 384
    n_hidden: int = 2
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
            layers += [nn.Linear(width, s.d_hidden), nn.GELU(), nn.Dropout(0.0)]
            width = s.d_hidden
        self.hidden = nn.Sequential(*layers)
        self.unembed = nn.Linear(width, s.d_vocab)

    def set_dropout(self, p: float) -> None:
        """Dropout is a training setting (TrainSettings.dropout), not part of the architecture."""
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        k = self.settings.context
        padded = F.pad(tokens, (k - 1, 0), value=BOS_ID)
        windows = padded.unfold(1, k, 1)  # [batch, pos, k]: tokens pos-k+1 .. pos
        real = tokens != PAD_ID  # padding positions are never a context that matters: skip their compute
        x = self.embed(windows[real]).flatten(-2)
        logits = torch.zeros(*tokens.shape, self.settings.d_vocab, dtype=x.dtype)
        logits[real] = self.unembed(self.hidden(x))
        return logits
