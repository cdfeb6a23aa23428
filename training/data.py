"""The corpus: French commune names with metadata, and a split by hash of the normalized name.

The split is decided per distinct spelling (sha1 of the NFC, lowercased, stripped name), so one spelling never sits
in two splits ("saint-martin" cannot leak) and adding rows never moves an existing name.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from training.errors import VillesError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
COMMUNES_TSV = DATA_DIR / "communes.tsv"
SPLITS = ("train", "val", "test")
SPLIT_BUCKETS = {"train": range(0, 80), "val": range(80, 90), "test": range(90, 100)}


def normalize(name: str) -> str:
    return unicodedata.normalize("NFC", name).strip().lower()


def split_of(name: str) -> str:
    """80/10/10 by the first bytes of sha1(normalized name): stable whatever else is in the corpus."""
    bucket = int.from_bytes(hashlib.sha1(normalize(name).encode("utf-8")).digest()[:4], "big") % 100
    return next(s for s, r in SPLIT_BUCKETS.items() if bucket in r)


@dataclass(frozen=True)
class Commune:
    name: str
    code: str = ""
    kind: str = ""
    department: str = ""
    region: str = ""  # region name, e.g. "Bretagne"
    population: int | None = None


@dataclass(frozen=True)
class Corpus:
    """Distinct names (first occurrence kept, file order) with the metadata of that first occurrence."""

    communes: tuple[Commune, ...]
    source: str = "communes.tsv"
    lowercase: bool = True
    names_file: str | None = None  # the names file it came from (None: the default communes table)
    counts: dict[str, int] = field(default_factory=dict, compare=False)  # occurrences per distinct name

    @cached_property
    def names(self) -> list[str]:
        return [c.name for c in self.communes]

    @cached_property
    def _splits(self) -> dict[str, list[Commune]]:
        out: dict[str, list[Commune]] = {s: [] for s in SPLITS}
        for c in self.communes:
            out[split_of(c.name)].append(c)
        return out

    def split(self, which: str) -> list[Commune]:
        if which == "all":
            return list(self.communes)
        if which not in SPLITS:
            raise VillesError(f"unknown split {which!r}: choose one of train, val, test, all")
        return self._splits[which]

    def split_names(self, which: str) -> list[str]:
        return [c.name for c in self.split(which)]

    @cached_property
    def name_set(self) -> frozenset[str]:
        return frozenset(self.names)


def _distinct(communes: list[Commune], lowercase: bool, source: str) -> Corpus:
    seen: dict[str, Commune] = {}
    counts: dict[str, int] = {}
    for c in communes:
        name = unicodedata.normalize("NFC", c.name).strip()
        if lowercase:
            name = name.lower()
        if not name:
            continue
        counts[name] = counts.get(name, 0) + 1
        if name not in seen:
            seen[name] = Commune(name, c.code, c.kind, c.department, c.region, c.population)
    return Corpus(tuple(seen.values()), source=source, lowercase=lowercase, counts=counts)


def load_communes(
    path: Path | str = COMMUNES_TSV, lowercase: bool = True, kinds: tuple[str, ...] | None = None
) -> Corpus:
    """The default corpus: every current, delegated and associated commune of the Code officiel géographique."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as e:
        raise VillesError(f"cannot read communes table {path}: {e}") from None
    communes = [
        Commune(
            r["name"],
            r["code"],
            r["kind"],
            r["department"],
            r["region_name"],
            int(r["population"]) if r.get("population") else None,
        )
        for r in rows
        if kinds is None or r["kind"] in kinds
    ]
    return _distinct(communes, lowercase, path.name)


def load_names_file(path: Path | str, lowercase: bool = True) -> Corpus:
    """Any text file with one name per line (e.g. the reference project's villes.txt); blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise VillesError(f"cannot read names file {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    corpus = _distinct([Commune(line) for line in lines], lowercase, path.name)
    if not corpus.communes:
        raise VillesError(f"names file {path} has no names")
    return dataclasses.replace(corpus, names_file=str(path.resolve()))


def load_corpus(names_file: Path | str | None = None, lowercase: bool = True) -> Corpus:
    return load_names_file(names_file, lowercase) if names_file else load_communes(lowercase=lowercase)
