"""Rebuild data/communes.tsv from the npm package @etalab/decoupage-administratif (MIT, Etalab).

Usage: python data/build_communes.py [--package-dir DIR] [--out data/communes.tsv]

Without --package-dir it runs `npm pack @etalab/decoupage-administratif@6.0.0` in a temporary folder (needs npm and
the npm registry). Municipal arrondissements (Paris, Lyon, Marseille) are not communes and are left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@etalab/decoupage-administratif@6.0.0"
KINDS = {"commune-actuelle": "current", "commune-deleguee": "delegated", "commune-associee": "associated"}
COLUMNS = ["code", "name", "kind", "department", "department_name", "region", "region_name", "population"]


def fetch_package(workdir: Path) -> Path:
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    (tgz,) = workdir.glob("*.tgz")
    with tarfile.open(tgz) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def build_rows(package_dir: Path) -> list[dict]:
    data = package_dir / "data"
    communes = json.loads((data / "communes.json").read_text(encoding="utf-8"))
    regions = {r["code"]: r["nom"] for r in json.loads((data / "regions.json").read_text(encoding="utf-8"))}
    departments = {d["code"]: d["nom"] for d in json.loads((data / "departements.json").read_text(encoding="utf-8"))}
    rows = []
    for c in communes:
        if c["type"] not in KINDS:  # arrondissement-municipal
            continue
        rows.append(
            {
                "code": c["code"],
                "name": c["nom"],
                "kind": KINDS[c["type"]],
                "department": c.get("departement", ""),
                "department_name": departments.get(c.get("departement", ""), ""),
                "region": c.get("region", ""),
                "region_name": regions.get(c.get("region", ""), ""),
                "population": c.get("population", ""),
            }
        )
    return rows


def write_tsv(rows: list[dict], out: Path) -> None:
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package-dir", type=Path, help="an unpacked copy of the npm package (skips npm pack)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("communes.tsv"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        package_dir = args.package_dir or fetch_package(Path(tmp))
        rows = build_rows(package_dir)
    write_tsv(rows, args.out)
    counts = {k: sum(r["kind"] == k for r in rows) for k in KINDS.values()}
    print(f"wrote {len(rows)} rows to {args.out}: {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
