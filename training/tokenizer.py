"""A character tokenizer that TransformerLens can use: a Hugging Face `PreTrainedTokenizerFast` over a WordLevel
vocabulary with a one-piece-per-character pre-tokenizer, saved to and loaded from a folder.

Ids: 0 <pad>, 1 <bos>, 2 <eos>, then the corpus's characters in sorted order. A name is encoded as
<bos> c1 … cn <eos>; the models predict c1 … cn and <eos> (n + 1 predictions per name).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from training.errors import VillesError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class CharTokenizer:
    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise VillesError("a character tokenizer takes single characters")
        self.itos: list[str] = [*SPECIALS, *self.chars]
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        self._hf = None

    @classmethod
    def from_names(cls, names: Iterable[str]) -> CharTokenizer:
        return cls(set("".join(names)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def n_outputs(self) -> int:
        """Symbols a model can predict: every character and <eos> (never <pad> or <bos>)."""
        return len(self.chars) + 1

    def encode(self, name: str, drop_unknown: bool = False) -> list[int]:
        """<bos> + characters + <eos>. An unknown character is an error naming it, unless drop_unknown."""
        ids = [BOS_ID]
        for ch in name:
            i = self.stoi.get(ch) if len(ch) == 1 else None
            if i is None or i < len(SPECIALS):
                if drop_unknown:
                    continue
                raise VillesError(f"unknown character {ch!r} in {name!r}: not in the tokenizer's vocabulary")
            ids.append(i)
        ids.append(EOS_ID)
        return ids

    def encode_prefix(self, prefix: str) -> list[int]:
        return self.encode(prefix)[:-1]

    def decode(self, ids: Iterable[int]) -> str:
        """Characters up to the first <eos>; specials are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i >= len(SPECIALS):
                out.append(self.itos[i])
        return "".join(out)

    def batch(self, names: Sequence[str], drop_unknown: bool = False) -> Int[Tensor, "batch pos"]:
        """Right-padded [batch, longest+2] tensor of ids."""
        seqs = [self.encode(n, drop_unknown) for n in names]
        out = torch.full((len(seqs), max(map(len, seqs))), PAD_ID, dtype=torch.long)
        for row, s in enumerate(seqs):
            out[row, : len(s)] = torch.tensor(s)
        return out

    def check(self, text: str, what: str = "prefix") -> None:
        bad = sorted({ch for ch in text if ch not in self.stoi or self.stoi[ch] < len(SPECIALS)})
        if bad:
            raise VillesError(f"unknown character {bad[0]!r} in {what} {text!r}: not in the tokenizer's vocabulary")

    # --- Hugging Face side -------------------------------------------------------------------------------------
    def to_hf(self):
        """A PreTrainedTokenizerFast with this vocabulary (built in memory; `save` gives it a folder name)."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        core = Tokenizer(models.WordLevel(vocab=self.stoi, unk_token=None))
        # one piece per character, spaces included, and decoding joins pieces without separators
        core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        core.decoder = decoders.Fuse()
        return PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=None, padding_side="right"
        )

    def save(self, folder: Path | str) -> None:
        """Write the HF tokenizer folder (plus chars.json, the plain vocabulary) atomically."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            self.to_hf().save_pretrained(tmp)
            (tmp / "chars.json").write_text(json.dumps(self.chars, ensure_ascii=False), encoding="utf-8")
            replace_dir(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, folder: Path | str) -> CharTokenizer:
        path = Path(folder) / "chars.json"
        try:
            chars = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise VillesError(f"no tokenizer in {folder}: cannot read {path.name} ({e.__class__.__name__})") from None
        return cls(chars)

    def load_hf(self, folder: Path | str):
        """The HF tokenizer loaded back from its folder, so it carries a `name_or_path` (TransformerLens needs it)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars


def replace_dir(tmp: Path, folder: Path) -> None:
    """Swap a finished temporary folder into place: never leaves a half-written folder under the final name."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old.{os.getpid()}")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
