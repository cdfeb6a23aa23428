"""The ladder of generators, from random letters to the HookedTransformer, behind one small interface:
`nll(names) -> (nats, symbols)`, `sample(SampleSettings) -> names`, `params`.

LEVELS is the registry: counting levels are fit on the corpus's train split on the fly (about a second); neural
levels load a checkpoint folder.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from training.data import Corpus
from training.errors import VillesError
from training.ngram import NGramModel, NGramSettings
from training.sampling import SampleSettings, check_sample_settings, sample_names
from training.tokenizer import CharTokenizer

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_CHECKPOINTS = {"mlp": CHECKPOINTS / "mlp", "transformer": CHECKPOINTS / "transformer"}
COUNTING_ORDERS = {"uniform": 0, "unigram": 1, "bigram": 2, "ngram": None}
LEVELS = {"uniform": 0, "unigram": 1, "bigram": 2, "ngram": 3, "mlp": 4, "transformer": 5}
DEFAULT_NGRAM_ORDER = 5


class CountingLM:
    def __init__(self, name: str, model: NGramModel):
        self.name, self.model, self.tokenizer = name, model, model.tokenizer

    @property
    def params(self) -> int:
        return self.model.params

    def nll(self, names: Sequence[str]) -> tuple[float, int]:
        return self.model.nll(names)

    def sample(self, s: SampleSettings) -> list[str]:
        check_sample_settings(s, self.tokenizer, None)
        return self.model.sample(s.n, s.seed, s.temperature, s.prefix)


class NeuralLM:
    def __init__(self, name: str, folder: Path):
        from training.neural import load_checkpoint

        self.name, self.folder = name, folder
        self.model, self.tokenizer, self.config = load_checkpoint(folder)
        if self.config["kind"] != name:
            raise VillesError(f"{folder} holds a {self.config['kind']} model, not {name}")

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def nll(self, names: Sequence[str]) -> tuple[float, int]:
        from training.lm import evaluate_nll

        for name in names:
            self.tokenizer.encode(name)
        return evaluate_nll(self.model, self.tokenizer, names)

    def sample(self, s: SampleSettings) -> list[str]:
        return sample_names(self.model, self.tokenizer, s).names


def load_level(
    name: str, corpus: Corpus, order: int | None = None, checkpoint: Path | str | None = None
) -> CountingLM | NeuralLM:
    if name in COUNTING_ORDERS:
        n = COUNTING_ORDERS[name]
        if n is None:
            n = DEFAULT_NGRAM_ORDER if order is None else order
        if n < 0:
            raise VillesError(f"--order must be >= 0, got {n}")
        tokenizer = CharTokenizer.from_names(corpus.names)
        return CountingLM(name, NGramModel(tokenizer, NGramSettings(order=n)).fit(corpus.split_names("train")))
    if name in DEFAULT_CHECKPOINTS:
        return NeuralLM(name, Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINTS[name])
    raise VillesError(f"unknown model {name!r}: choose one of {', '.join(LEVELS)}")


@dataclass
class LadderRow:
    level: int
    model: str
    params: int
    train_nll: float
    val_nll: float
    novelty: float
    samples: list[str]

    def display(self, **extra: str) -> dict[str, str | int]:
        """The row as printed in tables (CLI, demo, benchmark); `extra` columns go before the samples."""
        return {
            "level": self.level,
            "model": self.model,
            "params": self.params,
            "train NLL": f"{self.train_nll:.3f}",
            "val NLL": f"{self.val_nll:.3f}",
            "novelty": f"{self.novelty:.0%}",
            **extra,
            "samples": ", ".join(self.samples),
        }


def novelty(samples: Sequence[str], corpus: Corpus) -> float:
    """Share of samples that are not a name of the corpus (any split)."""
    return sum(s not in corpus.name_set for s in samples) / max(len(samples), 1)


def ladder(
    corpus: Corpus,
    order: int = DEFAULT_NGRAM_ORDER,
    checkpoints: dict | None = None,
    n_novelty: int = 1000,
    seed: int = 0,
    progress: bool = True,
    train_sample: int | None = None,
) -> tuple[list[LadderRow], list[str]]:
    """One row per level; neural levels whose checkpoint is absent or was built for other characters are skipped
    (the reason is returned as a note). `train_sample` measures the train column on a seeded sample of that many
    train names instead of all of them (the demo's shortcut: the train split is eight times the validation split)."""
    from tqdm.auto import tqdm

    rows, notes = [], []
    train_names = corpus.split_names("train")
    if train_sample is not None and train_sample < len(train_names):
        train_names = random.Random(seed).sample(train_names, train_sample)
        notes.append(f"train NLL measured on a seeded sample of {train_sample:,} train names")
    explicit = set(checkpoints or {})
    checkpoints = {**DEFAULT_CHECKPOINTS, **(checkpoints or {})}
    for name in tqdm(LEVELS, desc="ladder", disable=not progress):
        try:
            lm = load_level(name, corpus, order, checkpoints.get(name))
            trained_on = getattr(lm, "config", {}).get("corpus", {}).get("names_file")
            if name in DEFAULT_CHECKPOINTS and name not in explicit and trained_on != corpus.names_file:
                # a default checkpoint trained on another corpus may have seen this corpus's validation names
                raise VillesError(f"{checkpoints[name]} was trained on another corpus (pass it explicitly to score it)")
            train, val = lm.nll(train_names), lm.nll(corpus.split_names("val"))
        except VillesError as e:
            if name in COUNTING_ORDERS:
                raise
            notes.append(f"{name} left out: {e}")
            continue
        samples = lm.sample(SampleSettings(n=n_novelty, seed=seed))
        label = f"ngram (order {order})" if name == "ngram" else name
        rows.append(
            LadderRow(
                LEVELS[name],
                label,
                lm.params,
                train[0] / train[1],
                val[0] / val[1],
                novelty(samples, corpus),
                samples[:3],
            )
        )
    return rows, notes
