"""`villes demo`: the main job on the shipped checkpoints, no training. Each stage writes under `out/` and adds a
section to `out/index.html`; the terminal gets a short text summary."""

from __future__ import annotations

import dataclasses
import html
import json
import time
from pathlib import Path

from training.checkpoint import atomic_write_json, atomic_write_text


def ladder_stage(out: Path, progress: bool) -> tuple[str, str]:
    from training.cli import format_table
    from training.data import load_communes
    from training.ladder import ladder

    rows, notes = ladder(load_communes(), progress=progress)
    atomic_write_json(out / "ladder.json", [dataclasses.asdict(r) for r in rows])
    table = [r.display() for r in rows]
    text = format_table(table, list(table[0])) + "".join(f"\n{n}" for n in notes)
    return text, f"<h2>The ladder</h2><pre>{html.escape(text)}</pre><p><a href='ladder.json'>ladder.json</a></p>"


STAGES = {"ladder": ladder_stage}


def run_demo(out: Path | str = "out", progress: bool = True) -> str:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts, sections, timings = [], [], {}
    for name, stage in STAGES.items():
        t = time.perf_counter()
        text, section = stage(out, progress)
        timings[name] = round(time.perf_counter() - t, 1)
        texts.append(text)
        sections.append(section)
    page = (
        "<!doctype html><meta charset='utf-8'><title>villes demo</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:80em;margin:2em auto}pre{font-size:13px}</style>"
        "<h1>villes: French commune names, generated and opened</h1>" + "".join(sections)
    )
    atomic_write_text(out / "index.html", page)
    atomic_write_json(out / "timings.json", timings)
    return "\n\n".join(texts) + f"\n\nwritten: {out / 'index.html'} ({json.dumps(timings)} s)"
