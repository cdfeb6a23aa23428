"""`villes demo` on the shipped checkpoints: every rung of the ladder, in order, written under --out."""

import json

from training.cli import main


def test_demo_writes_the_ladder_with_every_level(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "ladder.json").read_text(encoding="utf-8"))
    assert [r["level"] for r in rows] == [0, 1, 2, 3, 4, 5]
    vals = [r["val_nll"] for r in rows]
    assert vals == sorted(vals, reverse=True)  # the ladder falls level by level on validation
    assert rows[-1]["model"] == "transformer" and rows[-1]["val_nll"] <= 1.60
    assert all(len(r["samples"]) == 3 for r in rows)
    assert "transformer" in out and (tmp_path / "index.html").read_text(encoding="utf-8").count("<h2>") >= 1
