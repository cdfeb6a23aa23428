"""`villes demo`: every stage on tiny checkpoints (fast), the ladder stage on the shipped ones, and bad input."""

import json
import re

import pytest

from training.demo import STAGE_NAMES, DemoSettings, run_demo
from training.errors import VillesError


@pytest.fixture(scope="module")
def tiny_sae_dir(tmp_path_factory, tiny_transformer_dir):
    from training.sae import SAESettings, train_sae_to_folder

    out = tmp_path_factory.mktemp("demo-sae") / "sae"
    settings = SAESettings(arch="topk", d_sae=32, k=4, tokens=40_000, batch_size=512)
    train_sae_to_folder(tiny_transformer_dir, settings, out, progress=False)
    return out


def test_every_other_stage_on_tiny_checkpoints_links_what_it_wrote(tmp_path, tiny_transformer_dir, tiny_sae_dir):
    stages = tuple(s for s in STAGE_NAMES if s != "ladder")
    settings = DemoSettings(
        checkpoint=tiny_transformer_dir, sae=tiny_sae_dir, stages=stages, steer_n=20, attribution_names=("saint-malo",)
    )
    text = run_demo(tmp_path, progress=False, settings=settings)
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert [s for s in STAGE_NAMES if f"id='{s}'" in index] == list(stages)
    links = re.findall(r"href='([^'#]+)'", index)
    assert {"dashboards/index.html", "monosemanticity/figures.html", "attribution/saint-malo.html"} <= set(links)
    assert all((tmp_path / link).is_file() for link in links), [
        link for link in links if not (tmp_path / link).is_file()
    ]
    timings = json.loads((tmp_path / "timings.json").read_text(encoding="utf-8"))
    assert set(stages) <= set(timings)
    sae = json.loads((tmp_path / "sae.json").read_text(encoding="utf-8"))
    assert sae["d_sae"] == 32 and 0 < sae["l0"] <= 4
    # every feature and neuron has a page, and the summary names each stage
    pages = list((tmp_path / "dashboards" / "units").rglob("*.html"))
    assert len(pages) == 32 + 32  # 32 features + 1 layer x d_mlp 32 neurons
    assert all(stage in text for stage in stages)


def test_ladder_stage_on_the_shipped_checkpoints(tmp_path):
    text = run_demo(tmp_path, progress=False, settings=DemoSettings(stages=("ladder",), novelty_samples=200))
    rows = json.loads((tmp_path / "ladder.json").read_text(encoding="utf-8"))
    assert [r["level"] for r in rows] == [0, 1, 2, 3, 4, 5]
    vals = [r["val_nll"] for r in rows]
    assert vals == sorted(vals, reverse=True)  # the ladder falls level by level on validation
    assert rows[-1]["model"] == "transformer" and rows[-1]["val_nll"] <= 1.60
    assert all(len(r["samples"]) == 3 for r in rows)
    assert "transformer" in text and "<h2 id='ladder'>" in (tmp_path / "index.html").read_text(encoding="utf-8")


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(VillesError, match="unknown demo stage"):
        run_demo(tmp_path / "a", settings=DemoSettings(stages=("nope",)))
    with pytest.raises(VillesError, match="not found"):
        run_demo(tmp_path / "b", settings=DemoSettings(checkpoint=tmp_path / "missing"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
