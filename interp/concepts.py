"""An automatic concept bank over commune names: binary labels per character position, generated from the data.

Positions. A name is tokenized `<bos> c0 … c(n-1) <eos>`; the bank has one row per *character* position c_i, in
corpus order (name 0's characters, then name 1's, …), which are exactly the positions an SAE here reads
(`training.sae.sae_positions`: not `<bos>`, `<eos>` or padding). The residual at c_i has read c0 … c_i and predicts
c(i+1) (or `<eos>`), so a label at row i describes the text *read so far* ending at c_i: "current character" is the
token at that position, "previous character" the one before it. `<bos>` is left out because its activation is one
constant vector, `<eos>` because nothing reads it.

Families, each chosen by frequency (thresholds in `BankSettings`), never by hand:
- char       the current character (c_i)
- prev       the previous character (c(i-1)); `^` at the first character of the name
- last2      the last 2 characters read, c(i-1) c_i (`^` marks the name start): the frequent ones
- last3      the last 3 characters read, c(i-2) c(i-1) c_i: the frequent ones
- word       inside a frequent word (a maximal run between separators ␣ - ' ( ): saint, sur, la, le, lès, …
- suffix     inside a frequent word ending (-ville, -court, -heim, -ac, …) of a word that is not itself frequent
- prefix     inside a frequent word beginning (mont-, ville-, …), same rule
             Words and affixes are frequent over the whole corpus, or within one region (a share of that region's
             words: Breton plou- and ker-, Alsatian -sheim, Corsican di, … that are rare in France as a whole); a
             concept chosen in a region labels its words in every region.
- boundary   right after a separator (hyphen, space, apostrophe, parenthesis); first letter of a word
- position   the character's index in the name, bucketed (0, 1, 2, 3-4, 5-7, 8-11, 12-17, 18+)
- region     the name's region (a name-level label, repeated on its positions); also a name-level bank of its own
             (`ConceptBank.name_labels`), scored on activations averaged over each name's characters

char, prev, last2, last3, boundary and position are causal (they depend on c0 … c_i only); word, suffix, prefix and
region describe the whole name, which the model can only infer from the prefix it has read. "Right after a hyphen /
space / apostrophe" alone are prev=- / prev=␣ / prev=' (kept once, in `prev`). Concepts whose rows are identical to
an earlier one's (e.g. position=0 and prev=^) are kept once, in the earlier family; `ConceptBank.aliases` lists the
others. Affixes are read on words that are not frequent words themselves (so "saint" does not make a suffix -aint);
a candidate affix is dropped when one longer affix accounts for most of its occurrences (-ille is mostly -ville).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from training.errors import VillesError

SEPARATORS = frozenset(" -'()")
START = "^"
CHAR_FAMILIES = ("char", "prev", "last2", "last3")  # values with a literal space: shown as ␣
FAMILIES = ("char", "prev", "last2", "last3", "word", "suffix", "prefix", "boundary", "position", "region")


def show(text: str) -> str:
    """A concept value as it appears in ids and tables (a space is invisible in a CSV cell)."""
    return text.replace(" ", "␣")


@dataclass(frozen=True)
class BankSettings:
    char_min: float = 1e-4  # char / prev: fraction of positions (and at least min_rows)
    ngram_min: float = 1e-3  # last2 / last3: fraction of positions
    word_min: float = 1e-3  # word: fraction of word tokens
    affix_min: float = 4e-3  # suffix / prefix: fraction of the (not frequent) word tokens
    affix_dominance: float = 0.75  # drop an affix when one longer affix covers this share of its occurrences
    suffix_lengths: tuple[int, int] = (2, 6)
    prefix_lengths: tuple[int, int] = (3, 6)
    position_buckets: tuple[int, ...] = (0, 1, 2, 3, 5, 8, 12, 18)  # bucket starts
    region_word_min: float = 1e-2  # word, also frequent when this fraction of one region's word tokens
    region_affix_min: float = 1e-2  # suffix / prefix, also frequent when this fraction of one region's rare words
    region_min_names: int = 30  # a region with fewer names has no concept (and chooses no word or affix)
    min_rows: int = 10  # any concept: at least this many positions

    def validate(self) -> None:
        for name in (
            "char_min",
            "ngram_min",
            "word_min",
            "affix_min",
            "affix_dominance",
            "region_word_min",
            "region_affix_min",
        ):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise VillesError(f"BankSettings.{name} must be a fraction in [0, 1], got {v}")
        b = self.position_buckets
        if not b or b[0] != 0 or any(x >= y for x, y in zip(b, b[1:], strict=False)):
            raise VillesError(f"position buckets must start at 0 and increase, got {b}")
        for lo, hi in (self.suffix_lengths, self.prefix_lengths):
            if not 1 <= lo <= hi:
                raise VillesError(f"affix lengths must satisfy 1 <= min <= max, got {(lo, hi)}")


@dataclass(frozen=True)
class ConceptLabels:
    """Binary labels of rows (character positions, or names) by concepts, stored compactly.

    `slots[r]` lists the indices of the concepts row r belongs to, padded with -1 (one block of columns per family, so
    a column holds few distinct values). `dense()` gives the [rows, concepts] matrix; `from_dense` goes back."""

    ids: tuple[str, ...]
    families: tuple[str, ...]
    slots: Int[Tensor, "row slot"]

    def __post_init__(self):
        if len(self.ids) != len(self.families):
            raise VillesError(f"{len(self.ids)} concept ids but {len(self.families)} families")
        if len(set(self.ids)) != len(self.ids):
            dup = next(i for i, n in Counter(self.ids).items() if n > 1)
            raise VillesError(f"concept id {dup!r} appears twice")
        if self.slots.ndim != 2:
            raise VillesError(f"slots must be [rows, slots], got shape {list(self.slots.shape)}")
        if self.slots.numel() and (int(self.slots.max()) >= len(self.ids) or int(self.slots.min()) < -1):
            raise VillesError("slots hold a concept index out of range")

    @property
    def n_rows(self) -> int:
        return self.slots.shape[0]

    @property
    def n_concepts(self) -> int:
        return len(self.ids)

    @classmethod
    def from_dense(
        cls, dense: Bool[Tensor, "row concept"], ids: Sequence[str], families: Sequence[str] | None = None
    ) -> ConceptLabels:
        """From a boolean matrix; concepts of one family share a block of slot columns (families default to one
        family per concept)."""
        if dense.ndim != 2 or dense.shape[1] != len(ids):
            raise VillesError(f"labels of shape {list(dense.shape)} do not match {len(ids)} concept ids")
        families = tuple(families) if families is not None else tuple(ids)
        dense = dense.bool()
        blocks = []
        for fam in dict.fromkeys(families):
            cols = torch.tensor([i for i, f in enumerate(families) if f == fam], dtype=torch.long)
            blocks.append(_slots_of(dense[:, cols], cols))
        slots = torch.cat(blocks, 1) if blocks else torch.empty(dense.shape[0], 0, dtype=torch.int32)
        return cls(tuple(ids), families, slots)

    def dense(self) -> Bool[Tensor, "row concept"]:
        out = torch.zeros(self.n_rows + 0, self.n_concepts + 1, dtype=torch.bool)  # last column catches the -1s
        rows = torch.arange(self.n_rows).unsqueeze(1).expand_as(self.slots)
        cols = torch.where(self.slots >= 0, self.slots.long(), self.n_concepts)
        out[rows, cols] = True
        return out[:, : self.n_concepts]

    def counts(self) -> Int[Tensor, "concept"]:
        flat = self.slots[self.slots >= 0].long()
        return torch.bincount(flat, minlength=self.n_concepts)

    def rows(self, index: Tensor) -> ConceptLabels:
        """The labels of a subset of rows (a boolean mask or indices), same concepts."""
        return ConceptLabels(self.ids, self.families, self.slots[index])

    def select(self, concepts: Sequence[int]) -> ConceptLabels:
        """A bank of the given concepts only, in the given order (rows unchanged)."""
        concepts = list(concepts)
        remap = torch.full((self.n_concepts + 1,), -1, dtype=torch.int32)
        remap[torch.tensor(concepts, dtype=torch.long)] = torch.arange(len(concepts), dtype=torch.int32)
        slots = remap[torch.where(self.slots >= 0, self.slots.long(), self.n_concepts)]
        slots = _compact(slots)
        return ConceptLabels(tuple(self.ids[i] for i in concepts), tuple(self.families[i] for i in concepts), slots)


def _slots_of(dense: Bool[Tensor, "row k"], cols: Tensor) -> Int[Tensor, "row slot"]:
    """Per row, the listed columns' indices where dense is true, left-aligned, padded with -1."""
    rows, k = dense.nonzero(as_tuple=True)  # row-major: sorted by row, then column
    width = int(dense.sum(1).max()) if rows.numel() else 0
    slots = torch.full((dense.shape[0], width), -1, dtype=torch.int32)
    if rows.numel():
        first = torch.searchsorted(rows, rows, right=False)
        rank = torch.arange(rows.numel()) - first
        slots[rows, rank] = cols[k].to(torch.int32)
    return slots


def _compact(slots: Int[Tensor, "row slot"]) -> Int[Tensor, "row slot"]:
    """Drop slot columns that are -1 everywhere (after a selection)."""
    keep = (slots >= 0).any(0)
    return slots[:, keep]


@dataclass(frozen=True)
class ConceptBank:
    """Position-level labels (one row per character of each name, corpus order) and name-level labels (region)."""

    names: tuple[str, ...]
    labels: ConceptLabels  # rows: character positions
    name_ids: Int[Tensor, "pos"]  # the name each position belongs to
    char_index: Int[Tensor, "pos"]  # the position's index in its name (0 = first character)
    name_labels: ConceptLabels  # rows: names
    aliases: dict[str, str] = field(default_factory=dict)  # dropped duplicate concept -> the id kept
    settings: BankSettings = BankSettings()

    @property
    def n_positions(self) -> int:
        return self.labels.n_rows

    def describe(self) -> list[dict]:
        """One row per concept: id, family, level, number of rows it labels."""
        out = []
        for level, labels in (("position", self.labels), ("name", self.name_labels)):
            counts = labels.counts().tolist()
            out += [
                {"id": i, "family": f, "level": level, "count": c}
                for i, f, c in zip(labels.ids, labels.families, counts, strict=True)
            ]
        return out


def build_bank(
    names: Sequence[str], regions: Sequence[str] | None = None, settings: BankSettings = BankSettings()
) -> ConceptBank:
    """The concept bank of `names` (each with its region, "" when unknown: no region family then)."""
    settings.validate()
    names = tuple(names)
    if not names:
        raise VillesError("no names to build a concept bank from")
    if any(not n for n in names):
        raise VillesError("an empty name cannot be labelled")
    regions = tuple(regions) if regions is not None else ("",) * len(names)
    if len(regions) != len(names):
        raise VillesError(f"{len(names)} names but {len(regions)} regions")

    lengths = np.fromiter((len(n) for n in names), dtype=np.int64, count=len(names))
    n_pos = int(lengths.sum())
    name_ids = np.repeat(np.arange(len(names)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    char_index = np.arange(n_pos) - starts[name_ids]
    text = "".join(names)
    alphabet = sorted(set(text))
    code = {ch: i + 1 for i, ch in enumerate(alphabet)}  # 0 is the name start (^)
    chars = np.fromiter((code[ch] for ch in text), dtype=np.int64, count=n_pos)
    base = len(alphabet) + 1
    prev = np.where(char_index >= 1, np.roll(chars, 1), 0)
    prev2 = np.where(char_index >= 2, np.roll(chars, 2), 0)
    symbol = [START, *alphabet]

    families: list[tuple[str, list[tuple[str, np.ndarray]]]] = []  # (family, [(value, row indices)])

    def categorical(values: np.ndarray, valid: np.ndarray, minimum: int, spell) -> list[tuple[str, np.ndarray]]:
        rows = np.flatnonzero(valid)
        keys, inverse, counts = np.unique(values[rows], return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return [
            (spell(int(k)), rows[order[bounds[j] : bounds[j + 1]]])
            for j, k in enumerate(keys)
            if counts[j] >= max(minimum, settings.min_rows)
        ]

    everywhere = np.ones(n_pos, dtype=bool)
    char_min = int(np.ceil(settings.char_min * n_pos))
    ngram_min = int(np.ceil(settings.ngram_min * n_pos))
    families.append(("char", categorical(chars, everywhere, char_min, lambda k: symbol[k])))
    families.append(("prev", categorical(prev, everywhere, char_min, lambda k: symbol[k])))
    families.append(
        (
            "last2",
            categorical(prev * base + chars, everywhere, ngram_min, lambda k: symbol[k // base] + symbol[k % base]),
        )
    )
    families.append(
        (
            "last3",
            categorical(
                (prev2 * base + prev) * base + chars,
                char_index >= 1,  # at c0 the context is only "^c0" (that is last2)
                ngram_min,
                lambda k: symbol[k // base**2] + symbol[k // base % base] + symbol[k % base],
            ),
        )
    )

    kept_regions = sorted(
        r for r, c in Counter(regions).items() if r and c >= max(settings.region_min_names, 1)
    )  # a region's names must be split in two halves, so very rare regions are left out
    region_index = {r: j for j, r in enumerate(kept_regions)}
    region_of_name = np.array([region_index.get(r, -1) for r in regions], dtype=np.int64)

    # words: maximal runs of non-separators, with the row of their first character (and their name's region)
    is_sep = np.fromiter((ch in SEPARATORS for ch in text), dtype=bool, count=n_pos)
    word_starts, word_ends, word_text, word_region = [], [], [], []
    for k, name in enumerate(names):
        i = 0
        while i < len(name):
            if name[i] in SEPARATORS:
                i += 1
                continue
            j = i
            while j < len(name) and name[j] not in SEPARATORS:
                j += 1
            word_starts.append(starts[k] + i)
            word_ends.append(starts[k] + j)
            word_text.append(name[i:j])
            word_region.append(region_of_name[k])
            i = j
    frequent = _frequent(word_text, settings.word_min, settings.min_rows)
    by_region: dict[int, list[int]] = {}  # word indices of each kept region
    for i, r in enumerate(word_region):
        if r >= 0:
            by_region.setdefault(int(r), []).append(i)
    for members in by_region.values():
        frequent |= _frequent([word_text[i] for i in members], settings.region_word_min, settings.min_rows)
    by_word: dict[str, list[np.ndarray]] = {}
    for s, e, w in zip(word_starts, word_ends, word_text, strict=True):
        if w in frequent:
            by_word.setdefault(w, []).append(np.arange(s, e))
    families.append(("word", [(w, np.concatenate(r)) for w, r in sorted(by_word.items())]))

    rare_idx = [i for i, w in enumerate(word_text) if w not in frequent]
    rare = [(word_starts[i], word_ends[i], word_text[i]) for i in rare_idx]
    rare_by_region = [[word_text[i] for i in rare_idx if word_region[i] == r] for r in sorted(by_region)]
    for fam, (lo, hi), at_end in (
        ("suffix", settings.suffix_lengths, True),
        ("prefix", settings.prefix_lengths, False),
    ):
        chosen = _affixes([w for _, _, w in rare], lo, hi, at_end, settings.affix_min, settings)
        for words in rare_by_region:
            chosen |= _affixes(words, lo, hi, at_end, settings.region_affix_min, settings)
        found: dict[str, list[np.ndarray]] = {}
        for s, e, w in rare:
            for length in range(lo, min(hi, len(w) - 1) + 1):
                piece = w[-length:] if at_end else w[:length]
                if piece in chosen:
                    found.setdefault(piece, []).append(np.arange(e - length, e) if at_end else np.arange(s, s + length))
        spell = (lambda a: "-" + a) if at_end else (lambda a: a + "-")
        families.append((fam, [(spell(a), np.concatenate(r)) for a, r in sorted(found.items())]))

    after_sep = np.flatnonzero((char_index >= 1) & np.roll(is_sep, 1) & ~is_sep)
    families.append(
        (
            "boundary",
            [("after_separator", after_sep), ("word_initial", np.asarray(sorted(word_starts), dtype=np.int64))],
        )
    )
    buckets = settings.position_buckets
    bucket = np.searchsorted(np.asarray(buckets), char_index, side="right") - 1

    def bucket_name(b: int) -> str:
        lo = buckets[b]
        if b + 1 == len(buckets):
            return f"{lo}+"
        hi = buckets[b + 1] - 1
        return str(lo) if hi == lo else f"{lo}-{hi}"

    families.append(("position", categorical(bucket, everywhere, 0, bucket_name)))

    pos_region = region_of_name[name_ids]
    families.append(("region", [(kept_regions[j], np.flatnonzero(pos_region == j)) for j in range(len(kept_regions))]))

    ids, fams, blocks, aliases = [], [], [], {}
    seen: dict[bytes, str] = {}
    for fam, concepts in families:
        cols: list[np.ndarray] = []
        for value, rows in concepts:
            if len(rows) < settings.min_rows:
                continue
            cid = f"{fam}={show(value) if fam in CHAR_FAMILIES else value}"
            rows = np.unique(rows)
            digest = hashlib.sha1(rows.astype(np.int64).tobytes()).digest()
            if digest in seen:  # identical rows to an earlier concept: one column is enough
                aliases[cid] = seen[digest]
                continue
            seen[digest] = cid
            ids.append(cid)
            fams.append(fam)
            cols.append(rows)
        if cols:
            blocks.append((len(ids) - len(cols), cols))
    slot_blocks = []
    for first, cols in blocks:
        pairs_row = np.concatenate(cols)
        pairs_col = np.concatenate([np.full(len(r), first + j) for j, r in enumerate(cols)])
        order = np.lexsort((pairs_col, pairs_row))
        r, c = pairs_row[order], pairs_col[order]
        rank = np.arange(len(r)) - np.searchsorted(r, r, side="left")
        block = np.full((n_pos, int(rank.max()) + 1), -1, dtype=np.int32)
        block[r, rank] = c
        slot_blocks.append(block)
    slots = (
        torch.from_numpy(np.concatenate(slot_blocks, 1)) if slot_blocks else torch.empty(n_pos, 0, dtype=torch.int32)
    )
    labels = ConceptLabels(tuple(ids), tuple(fams), slots)

    name_slots = torch.from_numpy(region_of_name.astype(np.int32)).unsqueeze(1)
    name_ids_ = tuple(f"region={r}" for r in kept_regions)
    name_labels = ConceptLabels(name_ids_, ("region",) * len(kept_regions), name_slots)
    if not kept_regions:
        name_labels = ConceptLabels((), (), torch.empty(len(names), 0, dtype=torch.int32))
    return ConceptBank(
        names=names,
        labels=labels,
        name_ids=torch.from_numpy(name_ids),
        char_index=torch.from_numpy(char_index),
        name_labels=name_labels,
        aliases=aliases,
        settings=settings,
    )


def _frequent(words: Sequence[str], fraction: float, min_rows: int) -> set[str]:
    """The words that make at least `fraction` of `words` (and at least `min_rows` of them)."""
    return {w for w, c in Counter(words).items() if c >= max(fraction * len(words), min_rows)}


def _affixes(words: Sequence[str], lo: int, hi: int, at_end: bool, fraction: float, settings: BankSettings) -> set[str]:
    """Word endings (or beginnings) strictly shorter than their word, on at least `fraction` of `words`, not mostly
    one longer affix."""
    counts: Counter[str] = Counter()
    for w in words:
        for length in range(lo, min(hi, len(w) - 1) + 1):
            counts[w[-length:] if at_end else w[:length]] += 1
    minimum = max(fraction * len(words), settings.min_rows)
    longer: dict[str, int] = {}  # the most frequent one-character extension of each affix
    for a, c in counts.items():
        if len(a) > lo:
            shorter = a[1:] if at_end else a[:-1]
            longer[shorter] = max(longer.get(shorter, 0), c)
    return {a for a, c in counts.items() if c >= minimum and longer.get(a, 0) < settings.affix_dominance * c}


def bank_for_corpus(corpus, settings: BankSettings = BankSettings(), split: str = "all") -> ConceptBank:
    """The bank of a `training.data.Corpus` split ("all": every name), with regions from its metadata."""
    communes = corpus.split(split)
    return build_bank([c.name for c in communes], [c.region for c in communes], settings)
