"""The ladder benchmark: every level's held-out NLL on the project's split, the n-gram sweep on both corpora (ours
and the reference project's villes.txt, both split by distinct name), beside the reference's published figures.

    python bench/ladder.py [--orders 1-8] [--villes ../shared/anchors/villes.txt]

Prints markdown tables (pasted into the README).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from training.cli import format_table
from training.data import load_communes, load_names_file
from training.ladder import ladder
from training.ngram import NGramModel, NGramSettings
from training.tokenizer import CharTokenizer

REFERENCE = {  # ../shared/anchors/README.md: the reference code on villes.txt (levels 1-3 on its training text)
    "uniform": "3.784",
    "unigram": "2.982 (train text)",
    "bigram": "2.391 (train text)",
    "ngram (order 5)": "1.812 trigram (train text); 1.715 5-gram abs. discounting, held-out",
    "mlp": "—",
    "transformer": "1.705 (1 layer d64, distinct-name split); 1.616 (2 layers d128)",
}
DEFAULT_VILLES = Path(__file__).resolve().parent.parent.parent / "shared" / "anchors" / "villes.txt"


def ngram_sweep(corpus, orders) -> list[dict]:
    tok = CharTokenizer.from_names(corpus.names)
    train, val = corpus.split_names("train"), corpus.split_names("val")
    rows = []
    for order in orders:
        row = {"order": order}
        for smoothing in ("kneser-ney", "absolute"):
            t = time.perf_counter()
            model = NGramModel(tok, NGramSettings(order=order, smoothing=smoothing)).fit(train)
            fit = time.perf_counter() - t
            total, n = model.nll(val)
            row[f"val {smoothing}"] = f"{total / n:.3f}"
            if smoothing == "kneser-ney":
                row["fit s"] = f"{fit:.2f}"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--orders", default="1-8")
    p.add_argument("--villes", type=Path, default=DEFAULT_VILLES, help="the reference project's villes.txt")
    args = p.parse_args(argv)
    lo, hi = map(int, args.orders.split("-"))
    corpus = load_communes()
    rows, notes = ladder(corpus, progress=False)
    for note in notes:
        print(note, file=sys.stderr)
    print("## Ladder (communes.tsv, validation = held-out distinct names)\n")
    table = [r.display(reference=REFERENCE.get(r.model, "")) for r in rows]
    print(format_table(table, list(table[0])))
    vals = [r.val_nll for r in rows]
    print(f"\nmonotone on validation: {all(a > b for a, b in zip(vals, vals[1:], strict=False))}")
    corpora = [("communes.tsv", corpus)]
    if args.villes.exists():
        corpora.append(("villes.txt (reference data)", load_names_file(args.villes)))
    for label, c in corpora:
        sizes = f"train {len(c.split('train'))} / val {len(c.split('val'))}"
        print(f"\n## n-gram sweep, {label}: val NLL by order ({sizes})\n")
        sweep = ngram_sweep(c, range(lo, hi + 1))
        print(format_table(sweep, list(sweep[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
