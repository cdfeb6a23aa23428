"""The counting rungs of the ladder: level 0 uniform, 1 unigram, 2 bigram, 3 n-gram of any order.

All of them are one estimator, interpolated Kneser-Ney (Chen & Goodman 1998) with one discount per order estimated
from the training counts (D = n1 / (n1 + 2 n2)), interpolated down to the uniform distribution so that every
held-out probability is finite. `smoothing="absolute"` gives plain interpolated absolute discounting (raw counts at
every order). Order 0 is the uniform distribution itself. Nothing here is learned by gradient descent: fitting an
order-6 model on the 28k training names takes about a second.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from training.errors import VillesError
from training.tokenizer import BOS_ID, EOS_ID, SPECIALS, CharTokenizer


@dataclass(frozen=True)
class NGramSettings:
    order: int = 5  # 0 uniform, 1 unigram, 2 bigram, n: n-1 letters of context
    smoothing: str = "kneser-ney"  # or "absolute"
    discount: float | None = None  # None: estimated per order from count-of-counts


class _Table:
    """Counts c(h, w) for one order, with c(h) and N1+(h ·) per history."""

    def __init__(self):
        self.counts: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.total: dict[tuple, int] = {}
        self.types: dict[tuple, int] = {}
        self.discount = 0.75

    def finish(self, discount: float | None) -> None:
        n1 = n2 = 0
        for h, row in self.counts.items():
            self.total[h] = sum(row.values())
            self.types[h] = len(row)
            for c in row.values():
                n1 += c == 1
                n2 += c == 2
        self.discount = discount if discount is not None else (n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5)


class NGramModel:
    """P(next | previous order-1 tokens); histories at the start of a name are padded with <bos>."""

    kind = "ngram"

    def __init__(self, tokenizer: CharTokenizer, settings: NGramSettings = NGramSettings()):
        if settings.order < 0:
            raise VillesError(f"n-gram order must be >= 0, got {settings.order}")
        if settings.smoothing not in ("kneser-ney", "absolute"):
            raise VillesError(f"unknown smoothing {settings.smoothing!r}: choose kneser-ney or absolute")
        self.tokenizer = tokenizer
        self.settings = settings
        self.order = settings.order
        # outputs are token ids of every character and <eos>; <pad> and <bos> are never predicted
        self.outputs = np.array([EOS_ID, *range(len(SPECIALS), tokenizer.vocab_size)])
        self.tables = [_Table() for _ in range(self.order)]  # tables[k]: histories of length k
        self._dist = lru_cache(maxsize=200_000)(self._distribution)

    # --- fitting -----------------------------------------------------------------------------------------------
    def fit(self, names: Sequence[str]) -> NGramModel:
        n = self.order
        top_seen: set[tuple] = set()
        for name in names:
            ids = [BOS_ID] * max(n - 2, 0) + self.tokenizer.encode(name)
            for i in range(max(n - 1, 1), len(ids)):
                gram = tuple(ids[max(0, i - n + 1) : i + 1])
                if n:
                    self.tables[n - 1].counts[gram[:-1]][gram[-1]] += 1
                top_seen.add(gram)
        kn = self.settings.smoothing == "kneser-ney"
        for k in range(n - 2, -1, -1):  # lower orders
            table = self.tables[k]
            if kn:  # continuation counts: distinct left-extensions of (h, w)
                for gram in top_seen if k == n - 2 else self._grams(k + 1):
                    g = gram[1:]
                    table.counts[g[:-1]][g[-1]] += 1
            else:
                for h, row in self.tables[k + 1].counts.items():
                    for w, c in row.items():
                        table.counts[h[1:]][w] += c
        for table in self.tables:
            table.finish(self.settings.discount)
        self._dist.cache_clear()
        return self

    def _grams(self, k: int):
        return ((*h, w) for h, row in self.tables[k].counts.items() for w in row)

    @property
    def params(self) -> int:
        return sum(len(row) for t in self.tables for row in t.counts.values())

    # --- probabilities -----------------------------------------------------------------------------------------
    def prob(self, history: tuple, w: int) -> float:
        p = 1.0 / len(self.outputs)
        for k in range(self.order):
            h = history[len(history) - k :] if k else ()
            table = self.tables[k]
            total = table.total.get(h)
            if not total:
                break  # longer histories are unseen too
            c = table.counts[h].get(w, 0)
            p = (max(c - table.discount, 0.0) + table.discount * table.types[h] * p) / total
        return p

    def _distribution(self, history: tuple) -> np.ndarray:
        p = np.full(len(self.outputs), 1.0 / len(self.outputs))
        for k in range(self.order):
            h = history[len(history) - k :] if k else ()
            table = self.tables[k]
            total = table.total.get(h)
            if not total:
                break
            counts = np.zeros(len(self.outputs))
            for w, c in table.counts[h].items():
                counts[self._slot(w)] = c
            p = (np.maximum(counts - table.discount, 0.0) + table.discount * table.types[h] * p) / total
        return p

    def _slot(self, w: int) -> int:
        return 0 if w == EOS_ID else w - len(SPECIALS) + 1

    def distribution(self, history: Sequence[int]) -> np.ndarray:
        """Probabilities over `self.outputs` (<eos>, then characters) after `history` (token ids, <bos> first)."""
        ids = (BOS_ID,) * self.order + tuple(history)
        return self._dist(ids[len(ids) - max(self.order - 1, 0) :] if self.order > 1 else ())

    def nll(self, names: Sequence[str]) -> tuple[float, int]:
        """(summed negative log-likelihood in nats, number of predicted symbols)."""
        total, count = 0.0, 0
        n = self.order
        for name in names:
            ids = [BOS_ID] * max(n - 1, 1) + self.tokenizer.encode(name)[1:]
            for i in range(max(n - 1, 1), len(ids)):
                total -= math.log(self.prob(tuple(ids[i - n + 1 : i]) if n > 1 else (), ids[i]))
                count += 1
        return total, count

    def sample(self, n: int, seed: int = 0, temperature: float = 1.0, prefix: str = "", max_len: int = 64) -> list[str]:
        rng = random.Random(seed)
        start = self.tokenizer.encode_prefix(prefix)
        names = []
        for _ in range(n):
            ids = list(start)
            while len(ids) <= max_len:
                p = self.distribution(ids)
                if temperature != 1.0:
                    p = p ** (1.0 / temperature)
                w = int(self.outputs[rng.choices(range(len(p)), weights=p)[0]])
                if w == EOS_ID:
                    break
                ids.append(w)
            names.append(self.tokenizer.decode(ids))
        return names
