"""The region classifier (beats a floor on held-out names, saves and loads exactly) and region steering (directions,
probes, SAE features, fitted vectors) on the tiny model; unknown regions are a VillesError."""

import pytest
import torch

from interp.regions import (
    ClassifierSettings,
    NaiveBayes,
    RegionClassifier,
    check_region,
    collect_region_sample,
    diff_of_means,
    direction_steering,
    feature_steering,
    fit_region_vectors,
    load_or_train_classifier,
    probe_direction,
    recall_table,
    region_features,
    region_steering_hooks,
    residual_hooks,
)
from training.data import Corpus
from training.errors import VillesError

FAST = ClassifierSettings(orders=(1, 2, 3, 4), steps=30, eval_every=10)


@pytest.fixture(scope="module")
def classifier(corpus):
    from interp.regions import train_region_classifier

    return train_region_classifier(corpus, FAST)


@pytest.fixture(scope="module")
def model(tiny_transformer_dir):
    from training.neural import load_checkpoint

    model, tok, _ = load_checkpoint(tiny_transformer_dir)
    return model, tok


def test_classifier_beats_the_floor_on_held_out_names(corpus, classifier):
    clf, info = classifier
    recall = recall_table(clf.predict, corpus, "test")
    floor = recall_table(NaiveBayes(corpus).predict, corpus, "test")
    for region in ("Bretagne", "Grand Est"):
        assert recall[region][0] > 0.35
    accuracy = sum(r * n for r, n in recall.values()) / sum(n for _, n in recall.values())
    accuracy_nb = sum(r * n for r, n in floor.values()) / sum(n for _, n in floor.values())
    majority = max(n for _, n in recall.values()) / sum(n for _, n in recall.values())
    assert accuracy > accuracy_nb and accuracy > majority + 0.2
    assert info["history"] and info["best_step"] > 0


def test_classifier_round_trip_and_determinism(tmp_path, corpus, classifier):
    clf, _ = classifier
    clf.save(tmp_path / "clf.safetensors")
    back = RegionClassifier.load(tmp_path / "clf.safetensors")
    names = ["plouguenast", "hagenthal-le-bas", "saint-martin", "ajaccio"]
    torch.testing.assert_close(back.logits(names), clf.logits(names))
    assert back.share(names, "Bretagne") == clf.share(names, "Bretagne")
    small = Corpus(corpus.communes[::7])
    settings = ClassifierSettings(orders=(1, 2), steps=5, eval_every=5)
    a, _ = load_or_train_classifier(small, tmp_path / "small.safetensors", settings)
    b, info = load_or_train_classifier(small, tmp_path / "small.safetensors", settings)  # from the cache
    assert "cached" in info
    c, _ = load_or_train_classifier(small, None, settings)  # trained again: same weights
    torch.testing.assert_close(a.weight, c.weight)
    torch.testing.assert_close(a.logits(names), b.logits(names))


def test_unknown_region(corpus, model):
    m, tok = model
    with pytest.raises(VillesError, match="unknown region"):
        check_region(corpus, "Atlantis")
    with pytest.raises(VillesError, match="unknown region"):
        collect_region_sample(m, tok, corpus, "bretagne", ["blocks.0.hook_resid_pre"])
    with pytest.raises(VillesError, match="unknown region"):
        fit_region_vectors(m, tok, corpus, "Bretagn", steps=1)
    with pytest.raises(VillesError, match="nothing to fit"):
        fit_region_vectors(m, tok, corpus, "Bretagne", steps=1, accept=lambda names: [False] * len(names))
    with pytest.raises(VillesError, match="unknown region"):
        region_steering_hooks(m, tok, corpus, "")
    with pytest.raises(VillesError, match="unknown region steering method"):
        region_steering_hooks(m, tok, corpus, "Bretagne", method="magic")
    with pytest.raises(VillesError, match="needs an SAE"):
        region_steering_hooks(m, tok, corpus, "Bretagne", method="sae-add")
    with pytest.raises(VillesError, match="unknown hook"):
        region_steering_hooks(m, tok, corpus, "Bretagne", method="probe", hook_name="blocks.7.hook_resid_pre")


def test_region_steering_at_several_hooks(corpus, model):
    m, tok = model
    hooks = region_steering_hooks(m, tok, corpus, "Bretagne", "diff-of-means", "all", alpha=2.0)
    assert [h for h, _ in hooks] == list(residual_hooks(m))
    tokens = tok.batch(["abbaye", "saint-denis"], drop_unknown=True)
    assert (m.run_with_hooks(tokens, fwd_hooks=hooks) - m(tokens)).abs().max() > 1e-4


def test_region_directions_and_features(corpus, model):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    m, tok = model
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]
    sample = collect_region_sample(m, tok, corpus, "Bretagne", hooks, n_uniform=400)
    assert sample.in_region.any() and sample.uniform.any()
    tokens = tok.batch(["abbaye", "saint-denis"], drop_unknown=True)
    clean = m(tokens)
    for h in hooks:
        dm, pr = diff_of_means(sample, h), probe_direction(sample, h, steps=20)
        assert torch.isfinite(dm.direction).all() and dm.direction.norm() > 0
        torch.testing.assert_close(pr.direction.norm(), dm.direction.norm())
        assert dm.region_mean - dm.overall_mean == pytest.approx(1.0, abs=1e-4)  # coordinates in units of d
        for mode in ("add", "clamp"):
            steered = m.run_with_hooks(tokens, fwd_hooks=direction_steering(m, dm, mode, 3.0))
            assert (steered - clean).abs().max() > 1e-4
        assert (m.run_with_hooks(tokens, fwd_hooks=direction_steering(m, dm, "add", 0.0)) - clean).abs().max() == 0
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post")))
    feats = region_features(sample, sae, top=3, min_frequency=0.0)
    assert len(feats) == 3 and feats[0].lift >= feats[1].lift >= feats[2].lift
    # with concept labels (monosemanticity rows), the features labelled with the region come first, best Mono1 first
    f = sae.encode(sample.acts["blocks.0.hook_resid_post"])
    live = [int(i) for i in (f > 0).any(0).nonzero().flatten()[:2]]
    rows = [
        {"kind": "feature", "index": i, "flags": "", "name_concept": "region=Bretagne", "name_mono1": m}
        for i, m in zip(live, (0.2, 0.4), strict=True)
    ] + [{"kind": "feature", "index": 0, "flags": "", "name_concept": "region=Corse", "name_mono1": 0.9}]
    labelled = region_features(sample, sae, top=3, min_frequency=0.0, labels=rows)
    assert [x.index for x in labelled[:2]] == live[::-1] and labelled[2].index == feats[0].index
    for mode in ("add", "clamp"):
        steered = m.run_with_hooks(tokens, fwd_hooks=feature_steering(m, sae, feats, mode, 2.0))
        assert torch.isfinite(steered).all()


def test_fitted_vectors_make_the_region_likelier(corpus, model):
    m, tok = model
    fitted = fit_region_vectors(
        m, tok, corpus, "Bretagne", ["blocks.0.hook_resid_pre"], first=2, steps=50, batch_size=32, lr=0.05,
        accept=lambda names: [i % 4 != 0 for i in range(len(names))],  # three quarters of the region's names
    )  # fmt: skip
    last = fitted.history[-1]
    assert last["val_nll_steered"] < last["val_nll_clean"]
    tokens = tok.batch(["abbaye", "saint-denis"], drop_unknown=True)
    assert (m.run_with_hooks(tokens, fwd_hooks=fitted.hooks(m, 0.0)) - m(tokens)).abs().max() == 0
    assert all(p.requires_grad for p in m.parameters()) or not any(p.requires_grad for p in m.parameters())
