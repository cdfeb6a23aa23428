"""Attribution: exact closure, agreement with exact ablation where the target is linear, ablation bookkeeping,
straight-through gradients across layers against an explicit computation, and bad inputs (API and CLI)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from interp.attribution import (
    FEATURE_LINK,
    METHODS,
    Target,
    ablated_target,
    attribute,
    feature_means,
    format_attribution,
    spearman,
    target_values,
    write_html,
)
from training.errors import VillesError
from training.tokenizer import BOS_ID, EOS_ID

NAME = "saint-malo"


# --- small models and SAEs made here -------------------------------------------------------------------------------
def make_sae(model, hook: str, d_sae: int = 32, k: int = 4, seed: int = 0, names=("saint-malo", "lyon", "brest")):
    """A TopK SAE with random unit decoder rows (encoder = decoder transposed) and b_dec the mean activation: no
    training, but every property tested here holds for any SAE (the error node absorbs what it misses)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_in = model.hook_dict[hook].__class__ and _width(model, hook)
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=hook)))
    w = torch.randn(d_sae, d_in, generator=gen)
    w = w / w.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w * 2.0)
        sae.W_enc.copy_(w.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(_acts(model, hook, names).mean(0))
    return sae.eval()


def _tok(model):
    from interp.attribution import model_tokenizer

    return model_tokenizer(model)


def _acts(model, hook, names):
    tokens = _tok(model).batch(list(names))
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook][tokens > EOS_ID]


def _width(model, hook):
    return _acts(model, hook, ["a"]).shape[-1]


@pytest.fixture(scope="module")
def tiny(tiny_transformer_dir):
    from training.neural import load_checkpoint

    model, tok, _ = load_checkpoint(tiny_transformer_dir)
    return model, tok


def _fresh_model(tiny_transformer_dir, n_layers: int, normalization: str | None = "LN", d_model: int = 16):
    """An untrained (seeded) HookedTransformer on the fixture's tokenizer: enough for exactness properties."""
    from training.tokenizer import CharTokenizer
    from training.transformer import TransformerSettings, build_model

    tok = CharTokenizer.load(tiny_transformer_dir / "tokenizer")
    cfg = TransformerSettings(n_layers=n_layers, d_model=d_model, n_heads=2, d_mlp=32, n_ctx=40).hooked_config(
        tok.vocab_size
    )
    cfg["normalization_type"] = normalization
    torch.manual_seed(1)
    return build_model(cfg, tiny_transformer_dir / "tokenizer")


# --- direct attribution ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target", [Target(kind="logprob"), Target(kind="logit"), Target("a", "logit_diff", "e"), Target("o", "logprob")]
)
def test_direct_terms_sum_to_the_target_exactly(tiny, target):
    model, _ = tiny
    sae = make_sae(model, "blocks.0.hook_resid_post")
    result = attribute(model, sae, NAME, target=target, methods=["direct", "gxa"], faithfulness=False)
    assert len(result.predictions) == len(NAME) + 1
    frozen_all = attribute(model, sae, NAME, target=target, methods=["gxa"], faithfulness=False, freeze_norms="all")
    for a, b in zip(result.predictions, frozen_all.predictions, strict=True):
        assert [r.scores["gxa"] for r in a.rows if r.kind == "feature"] == pytest.approx(
            [r.scores["gxa"] for r in b.rows if r.kind == "feature"], abs=1e-5
        )
    for pred in result.predictions:
        # recompute the sum from the public rows: features + error + bias + rest (+ softmax), against the model
        total = sum(r.scores["direct"] for r in pred.rows if math.isfinite(r.scores.get("direct", math.nan)))
        tokens = _tok(model).batch([NAME])[:, :-1]
        logits = model(tokens)[0, pred.position]
        t = torch.tensor(_tok(model).stoi.get(pred.symbol, EOS_ID))
        v = torch.tensor(_tok(model).stoi[target.versus]) if target.versus else None
        assert abs(total - target_values(logits, target.kind, t, v).item()) <= 1e-4
        assert pred.closure <= 1e-4
        kinds = [r.kind for r in pred.rows]
        assert kinds.count("error") == 1 and kinds.count("bias") == 1 and "rest" in kinds
        assert ("softmax" in kinds) == (target.kind == "logprob")
        # with the final norm frozen, gradient x activation at the last residual stream is the same decomposition
        # (freeze_norms="all" freezes the blocks' norms too: nothing between this SAE and the output changes)
        for r in pred.rows:
            if r.kind in ("feature", "error", "bias"):
                assert r.scores["gxa"] == pytest.approx(r.scores["direct"], abs=1e-5)


def test_direct_needs_an_sae_on_the_last_residual_stream(tiny_transformer_dir):
    model = _fresh_model(tiny_transformer_dir, 2)
    sae = make_sae(model, "blocks.0.hook_resid_post")
    with pytest.raises(VillesError, match="last residual stream"):
        attribute(model, sae, NAME, position=3, methods=["direct"])
    assert "direct" not in attribute(model, sae, NAME, position=3, faithfulness=False).methods


# --- agreement with exact ablation where the target is linear in the features ---------------------------------------
@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_every_method_equals_exact_ablation_when_the_target_is_linear(tiny_transformer_dir, baseline):
    # no final norm and a logit target: the target is affine in the last residual stream, hence in the features
    model = _fresh_model(tiny_transformer_dir, 1, normalization=None)
    sae = make_sae(model, "blocks.0.hook_resid_post")
    means = feature_means(model, sae, ["lyon", "paris", "brest", "nantes"]) if baseline == "mean" else None
    result = attribute(model, sae, NAME, target=Target(kind="logit"), baseline=baseline, means=means, ig_steps=4)
    n = 0
    for pred in result.predictions:
        for r in pred.rows:
            if r.kind in ("feature", "error", "bias"):
                for m in ("direct", "gxa", "atp") + (("ig",) if r.kind == "feature" else ()):
                    assert r.scores[m] == pytest.approx(r.scores["ablation"], abs=1e-4), (m, r)
                n += r.kind == "feature"
        for c in pred.completeness:
            assert abs(c["gap"]) <= 1e-4
        f = pred.faithfulness[result.saes[0]]
        assert all(v == pytest.approx(1.0) for v in f["spearman"].values() if not math.isnan(v))
    assert n >= 4 * len(result.predictions) - 2  # TopK k=4: the test really compared features


# --- ablation bookkeeping -------------------------------------------------------------------------------------------
# the last residual stream reaches the target at its own position only; the first one also from upstream ones
@pytest.mark.parametrize("hook, q", [("blocks.0.hook_resid_post", 6), ("blocks.0.hook_resid_pre", 3)])
def test_ablating_all_features_error_and_bias_is_zero_ablation(tiny, hook, q):
    model, _ = tiny
    sae = make_sae(model, hook)
    position = 6

    def zero_at_q(x, hook):
        x = x.clone()
        x[:, q] = 0.0
        return x

    tokens = _tok(model).batch([NAME])[:, :-1]
    with torch.no_grad(), model.hooks(fwd_hooks=[(hook, zero_at_q)]):
        logits = model(tokens)[0, position]
    t = torch.tensor(_tok(model).stoi[NAME[position]])
    expected = target_values(logits, "logprob", t).item()
    nodes = [(hook, q, "features"), (hook, q, "error"), (hook, q, "bias")]
    # float32 leaves ~1e-6 of the activation; on the last residual stream LayerNorm divides it by sqrt(eps) ~ 3e-3
    assert ablated_target(model, sae, NAME, position, nodes) == pytest.approx(expected, abs=1e-3)
    # features and error only: the activation becomes the SAE's reconstruction of no features, decode(0) = b_dec
    bias = sae.decode(torch.zeros(1, sae.cfg.d_sae))[0]

    def bias_at_q(x, hook):
        x = x.clone()
        x[:, q] = bias
        return x

    with torch.no_grad(), model.hooks(fwd_hooks=[(hook, bias_at_q)]):
        logits = model(tokens)[0, position]
    got = ablated_target(model, sae, NAME, position, nodes[:2])
    assert got == pytest.approx(target_values(logits, "logprob", t).item(), abs=1e-5)
    clean = attribute(model, sae, NAME, position=position, methods=["ablation"], faithfulness=False)[position].value
    assert abs(got - clean) > 1e-3  # the ablation changed something: the comparison above is not vacuous


def test_single_ablations_are_true_changes_and_curve_ends_at_full_recovery(tiny):
    model, _ = tiny
    hook = "blocks.0.hook_resid_post"
    sae = make_sae(model, hook)
    result = attribute(model, sae, NAME, position=4, methods=["gxa"])
    pred = result[4]
    for r in pred.features()[:3]:
        changed = ablated_target(model, sae, NAME, 4, [(hook, 4, r.feature)])
        assert r.scores["ablation"] == pytest.approx(pred.value - changed, abs=1e-5)
    f = pred.faithfulness[hook]
    curve = dict(f["keep_top_k"]["gxa"])
    assert curve[0] == pytest.approx(0.0, abs=1e-6) and curve[f["n_features"]] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= f["error_share"]["gxa"] <= 1.0


# --- across layers: straight-through gradients ------------------------------------------------------------------------
def test_multilayer_gradients_pass_straight_through_the_downstream_sae(tiny_transformer_dir):
    model = _fresh_model(tiny_transformer_dir, 2)
    h0, h1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    sae0, sae1 = make_sae(model, h0, seed=1), make_sae(model, h1, seed=2)
    position = 7
    result = attribute(model, [sae0, sae1], NAME, position=position, methods=["gxa"], faithfulness=False)
    pred = result[position]
    tok = _tok(model)
    tokens = tok.batch([NAME])[:, :-1]
    t = torch.tensor(tok.stoi[NAME[position]])

    # explicit: d target / d resid_post_0 in the plain model (no SAE anywhere), final norm's scale frozen
    leaf = {}

    def make_leaf(x, hook):
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]

    with model.hooks(fwd_hooks=[(h0, make_leaf), ("ln_final.hook_scale", lambda s, hook: s.detach())]):
        value = target_values(model(tokens)[0, position], "logprob", t)
        (grad,) = torch.autograd.grad(value, leaf["x"])
    f0 = sae0.encode(leaf["x"].detach())[0]
    dirs = sae0.W_dec.detach()
    rows = [r for r in pred.features() if r.sae == h0]
    assert len(rows) >= 4 * (position + 1) - 4  # features at every position up to the target
    for r in rows:
        expected = (f0[r.position, r.feature] * dirs[r.feature] @ grad[0, r.position]).item()
        assert r.scores["gxa"] == pytest.approx(expected, abs=1e-5), r

    # the trap this guards against: following the downstream SAE's Jacobian gives other numbers
    def jacobian_splice(x, hook):
        recon = sae1.decode(sae1.encode(x))
        return recon + (x - recon).detach()

    with model.hooks(
        fwd_hooks=[(h0, make_leaf), (h1, jacobian_splice), ("ln_final.hook_scale", lambda s, hook: s.detach())]
    ):
        value = target_values(model(tokens)[0, position], "logprob", t)
        (jac_grad,) = torch.autograd.grad(value, leaf["x"])
    assert (jac_grad - grad).abs().max() > 1e-3

    # graph edges: layer-0 feature -> layer-1 feature, checked against d a_v / d eps along the feature's direction
    graph = attribute(model, [sae0, sae1], NAME, position=position, methods=["gxa"], faithfulness=False)[position].graph
    json.dumps(graph)
    kinds = {n["kind"] for n in graph["nodes"]}
    assert {"input", "feature", "output"} <= kinds
    edges = [e for e in graph["edges"] if e["source"].startswith(f"f:{h0}") and e["target"].startswith(f"f:{h1}")]
    assert edges
    e = max(edges, key=lambda e: abs(e["on_activation"]))
    _, _, qu, iu = e["source"].split(":")
    _, _, qv, iv = e["target"].split(":")
    eps = torch.zeros((), requires_grad=True)
    seen = {}

    def push(x, hook):
        x = x.clone()
        x[:, int(qu)] = x[:, int(qu)] + eps * dirs[int(iu)]
        return x

    def grab(x, hook):
        seen["x"] = x

    with model.hooks(fwd_hooks=[(h0, push), (h1, grab)]):
        model(tokens, stop_at_layer=2)
    a_v = sae1.encode(seen["x"])[0, int(qv), int(iv)]
    (da,) = torch.autograd.grad(a_v, eps)
    assert e["on_activation"] == pytest.approx((f0[int(qu), int(iu)] * da).item(), rel=1e-4, abs=1e-6)


def test_integrated_gradients_complete_with_enough_steps(tiny_transformer_dir):
    model = _fresh_model(tiny_transformer_dir, 2)
    sae0 = make_sae(model, "blocks.0.hook_resid_post", seed=3)
    result = attribute(model, sae0, "brest", position=3, methods=["ig"], ig_steps=64, faithfulness=False)
    (c,) = result[3].completeness
    assert abs(c["gap"]) <= 1e-3 * max(1.0, abs(c["change"]))


# --- output ----------------------------------------------------------------------------------------------------
def test_views_json_html_and_determinism(tiny, tmp_path):
    model, _ = tiny
    sae = make_sae(model, "blocks.0.hook_resid_post")
    a = attribute(model, sae, NAME, labels={3: "after saint"})
    b = attribute(model, sae, NAME, labels={3: "after saint"})
    assert a.to_json() == b.to_json()
    data = json.loads(a.to_json())
    rows = data["predictions"][6]["rows"]
    feats = [r for r in rows if r["kind"] == "feature"]
    assert feats[0]["link"] == FEATURE_LINK.format(index=feats[0]["feature"])
    assert all(r["label"] == ("after saint" if r["feature"] == 3 else "") for r in feats)
    table = format_attribution(a, 6)
    assert "closure (direct)" in table and "Spearman" in table and "label" in table
    assert len(format_attribution(a).splitlines()) == len(NAME) + 1 + 4
    page = write_html(a, tmp_path / "out" / "attr.html", start=6)
    text = page.read_text(encoding="utf-8")
    assert '<script src="plotly.min.js">' in text and "cdn" not in text.lower()
    assert (tmp_path / "out" / "plotly.min.js").stat().st_size > 1_000_000


def test_spearman_handles_ties_and_degenerate_input():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(spearman(torch.tensor([1.0, 2]), torch.tensor([1.0, 2])))
    assert math.isnan(spearman(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])))


# --- bad input -----------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_one_clear_error(tiny, tiny_transformer_dir):
    model, _ = tiny
    sae = make_sae(model, "blocks.0.hook_resid_post")
    with pytest.raises(VillesError, match="unknown character '!'"):
        attribute(model, sae, "saint!")
    with pytest.raises(VillesError, match="outside"):
        attribute(model, sae, NAME, position=len(NAME) + 1)
    with pytest.raises(VillesError, match="outside"):
        attribute(model, sae, NAME, position=-1)
    with pytest.raises(VillesError, match="not a symbol the model predicts"):
        attribute(model, sae, NAME, target="Z")
    with pytest.raises(VillesError, match="not a symbol the model predicts"):
        attribute(model, sae, NAME, target="<bos>")
    with pytest.raises(VillesError, match="empty name"):
        attribute(model, sae, "")
    with pytest.raises(VillesError, match="unknown method"):
        attribute(model, sae, NAME, methods=["magic"])
    with pytest.raises(VillesError, match="needs means"):
        attribute(model, sae, NAME, baseline="mean")
    with pytest.raises(VillesError, match="freeze_norms"):
        attribute(model, sae, NAME, freeze_norms="some")
    other = _fresh_model(tiny_transformer_dir, 1, d_model=24)  # an SAE of another model: widths differ
    with pytest.raises(VillesError, match="SAE/model mismatch"):
        attribute(model, make_sae(other, "blocks.0.hook_resid_post"), NAME)
    stray = make_sae(model, "blocks.0.hook_resid_post")
    stray.cfg.metadata.hook_name = "blocks.5.hook_resid_post"
    with pytest.raises(VillesError, match="SAE/model mismatch"):
        attribute(model, stray, NAME)
    assert BOS_ID not in (_tok(model).stoi[c] for c in NAME)


def test_cli_attribute(tiny, tiny_transformer_dir, tmp_path, capsys):
    from interp.attribution_cli import METHOD_NAMES
    from training.cli import main

    assert set(METHOD_NAMES) == set(METHODS)
    model, _ = tiny
    sae_dir = tmp_path / "sae"
    make_sae(model, "blocks.0.hook_resid_post").save_model(sae_dir)
    base = ["attribute", "--checkpoint", str(tiny_transformer_dir), "--sae", str(sae_dir)]
    assert main([*base, "Saint-Malo", "--position", "6", "--method", "direct", "--method", "ablation"]) == 0
    out = capsys.readouterr().out
    assert "closure (direct)" in out and "'saint-' → 'm'" in out
    html = tmp_path / "page.html"
    assert main([*base, NAME, "--json", "--baseline", "zero", "--html", str(html)]) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == len(NAME) + 1 and html.is_file()
    bad = [
        [NAME + "!"],  # unknown character
        [NAME, "--position", "99"],  # outside the name
        [NAME, "--target", "Z"],  # not in the vocabulary
        [NAME, "--ig-steps", "0"],
    ]
    for extra in bad:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("villes: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    other = _fresh_model(tiny_transformer_dir, 1, d_model=24)
    make_sae(other, "blocks.0.hook_resid_post").save_model(tmp_path / "other")
    assert main([*base[:-1], str(tmp_path / "other"), NAME]) == 2
    assert "SAE/model mismatch" in capsys.readouterr().err
    foreign = make_sae(model, "blocks.0.hook_resid_post")
    foreign.cfg.metadata.model_sha256 = "0" * 64  # trained on other weights of the same shape
    foreign.save_model(tmp_path / "foreign")
    assert main([*base[:-1], str(tmp_path / "foreign"), NAME]) == 2
    assert "other weights" in capsys.readouterr().err


# --- concept labels from a monosemanticity report ------------------------------------------------------------------
def test_labels_from_a_monosemanticity_report(tiny, tiny_transformer_dir, tiny_corpus, tmp_path, capsys):
    from interp.monosemanticity import monosemanticity, sae_labels, unit_labels, write_report
    from training.cli import main

    model, _ = tiny
    sae = make_sae(model, "blocks.0.hook_resid_post")
    report = monosemanticity(model, sae, tiny_corpus.names, controls=False)
    folder = tmp_path / "mono"
    write_report(report, folder, figs=False)
    expected = {i: v for (kind, _, i), v in unit_labels(report).items() if kind == "feature"}
    assert expected and sae_labels(folder, sae) == expected == sae_labels(report.rows, sae)
    a = attribute(model, sae, NAME, position=6, labels=report, faithfulness=False, methods=["gxa"], graph=True)
    b = attribute(model, sae, NAME, position=6, labels=folder, faithfulness=False, methods=["gxa"], graph=True)
    assert a.to_json() == b.to_json()
    data = json.loads(a.to_json())["predictions"][0]
    feats = [r for r in data["rows"] if r["kind"] == "feature"]
    for r in feats:
        concept, score = expected[r["feature"]]
        assert r["label"] == f"{concept} {score:.2f}" and r["label_score"] == pytest.approx(score)
    nodes = [n for n in data["graph"]["nodes"] if n["kind"] == "feature"]
    assert nodes and all(n["label"] and "label_score" in n for n in nodes)
    assert any(f"{expected[feats[0]['feature']][0]}" in line for line in format_attribution(a, 6).splitlines())
    # a report of another SAE (same hook and width, other weights) or of no SAE is refused
    with pytest.raises(VillesError, match="another SAE"):
        attribute(model, make_sae(model, "blocks.0.hook_resid_post", seed=1), NAME, labels=folder)
    with pytest.raises(VillesError, match="another SAE"):
        attribute(model, make_sae(model, "blocks.0.hook_resid_post", d_sae=16), NAME, labels=report.rows)
    with pytest.raises(VillesError, match="no SAE features on blocks.0.hook_mlp_out"):
        sae_labels(report, sae, "blocks.0.hook_mlp_out")
    # the command line: --labels DIR; a folder that is no report, or a report of another SAE, exits 2
    sae_dir, other_dir = tmp_path / "sae", tmp_path / "other"
    sae.save_model(sae_dir)
    make_sae(model, "blocks.0.hook_resid_post", seed=1).save_model(other_dir)
    base = ["attribute", "--checkpoint", str(tiny_transformer_dir), "--baseline", "zero", NAME, "--position", "6"]
    base.append("--labels")
    assert main([*base, str(folder), "--sae", str(sae_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"][0]["rows"]
    shown = {r["feature"]: r["label"] for r in rows if r["kind"] == "feature"}
    assert shown and all(label == "{} {:.2f}".format(*expected[f]) for f, label in shown.items())
    for labels, sae_folder, message in (
        (tmp_path / "missing", sae_dir, "no units.json"),
        (folder, other_dir, "another SAE"),
    ):
        assert main([*base, str(labels), "--sae", str(sae_folder)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
