"""Steering hooks: identities are exact, error preservation, composition, position masks (also in cached generation),
the effect report, and bad input (VillesError in the API, exit 2 with nothing written on the command line)."""

import json
import math

import pytest
import torch

from interp.steering import (
    NOOP_HOOKS,
    Edit,
    Where,
    add_direction,
    add_feature,
    add_neuron,
    clamp_direction,
    clamp_feature,
    clamp_neuron,
    compose,
    effect_report,
    feature_hooks,
    parse_edits,
    scale_feature,
)
from training.cli import main
from training.errors import VillesError
from training.lm import log_probs
from training.sampling import SampleSettings, sample_names

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model(tiny_transformer_dir):
    from training.neural import load_checkpoint

    model, tok, _ = load_checkpoint(tiny_transformer_dir)
    return model, tok


def _sae(arch: str, d_in: int = 16, d_sae: int = 48, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=HOOK)
    if arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=4, metadata=meta))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    with torch.no_grad():  # a non-zero encoder bias so that some features are off and some are on
        sae.b_enc.normal_(0, 0.5)
    return sae.eval()


@pytest.fixture(scope="module")
def tokens(model):
    _, tok = model
    return tok.batch(["abbaye", "le mont", "saint-denis", "ault"], drop_unknown=True)


def _logits(model, tokens, hooks=()):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=list(hooks)) if hooks else model(tokens)


def _at_hook(model, tokens, hooks=()):
    """The activation at HOOK once the given hooks have run (they come first in the list)."""
    seen = []

    def grab(x, hook):
        seen.append(x.detach().clone())

    _logits(model, tokens, [*hooks, (HOOK, grab)])
    return seen[0]


def _features(model, sae, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        return sae.encode(cache[HOOK])


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_identities_change_nothing(model, tokens, arch):
    m, _ = model
    sae = _sae(arch)
    clean = _logits(m, tokens)
    f = _features(m, sae, tokens)
    inactive = int((f > 0).flatten(0, 1).any(0).logical_not().nonzero()[0])
    active = int((f > 0).flatten(0, 1).any(0).nonzero()[0])
    for hooks in (
        add_feature(m, sae, active, 0.0),
        clamp_feature(m, sae, inactive, 0.0),
        scale_feature(m, sae, active, 1.0),
        add_neuron(m, "blocks.0.mlp.hook_post", 3, 0.0),
        add_direction(m, HOOK, torch.randn(16), 0.0),
        clamp_feature(m, sae, inactive, 0.0, where=Where(first=3)),
    ):
        assert (_logits(m, tokens, hooks) - clean).abs().max() <= 1e-6


def test_error_preservation_reproduces_clean_logits(model, tokens):
    m, _ = model
    sae = _sae("topk")
    clean = _logits(m, tokens)
    nothing = {0: Edit("scale", 1.0), 5: Edit("add", 0.0)}
    kept = _logits(m, tokens, feature_hooks(m, sae, nothing, keep_error=True))
    spliced = _logits(m, tokens, feature_hooks(m, sae, nothing, keep_error=False))
    assert (kept - clean).abs().max() <= 1e-6
    assert (spliced - clean).abs().max() > 1e-3  # a random SAE reconstructs badly: the error term is what kept it


def test_steering_changes_the_activation_by_the_decoder_direction(model, tokens):
    m, _ = model
    sae = _sae("topk")
    clean = _at_hook(m, tokens)
    added = _at_hook(m, tokens, add_feature(m, sae, 7, 2.5))
    torch.testing.assert_close(added - clean, (2.5 * sae.W_dec[7]).expand_as(clean))
    # clamp moves the activation along the decoder direction by (value - current activation)
    clamped = _at_hook(m, tokens, clamp_feature(m, sae, 7, 4.0))
    f7 = sae.encode(clean)[..., 7]
    torch.testing.assert_close(clamped - clean, (4.0 - f7)[..., None] * sae.W_dec[7])


def test_hooks_compose(model, tokens):
    m, _ = model
    sae = _sae("topk")
    both = _logits(m, tokens, feature_hooks(m, sae, {3: Edit("add", 1.5), 9: Edit("add", -2.0)}))
    chained = _logits(m, tokens, compose(add_feature(m, sae, 3, 1.5), add_feature(m, sae, 9, -2.0)))
    torch.testing.assert_close(both, chained, atol=1e-5, rtol=0)
    d = torch.randn(16)
    torch.testing.assert_close(
        _logits(m, tokens, add_direction(m, HOOK, d, 1.0) + add_direction(m, HOOK, d, 2.0)),
        _logits(m, tokens, add_direction(m, HOOK, d, 3.0)),
        atol=1e-5,
        rtol=0,
    )
    # different kinds at different hooks, in one list, usable with model.hooks(...) too
    hooks = compose(clamp_neuron(m, "blocks.0.mlp.hook_post", 2, 1.0), clamp_direction(m, HOOK, d, 0.5))
    with m.hooks(fwd_hooks=hooks), torch.no_grad():
        via_context = m(tokens)
    torch.testing.assert_close(via_context, _logits(m, tokens, hooks))
    assert (via_context - _logits(m, tokens)).abs().max() > 1e-3


def test_clamp_direction_sets_the_coordinate(model, tokens):
    m, _ = model
    d = torch.randn(16)
    x = _at_hook(m, tokens, clamp_direction(m, HOOK, d, 0.7))
    torch.testing.assert_close(x @ d / (d @ d), torch.full(tokens.shape, 0.7), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "where",
    [Where(first=3), Where(positions=(0, 4)), Where(after="-"), Where(after="a", first=5)],
    ids=["first", "positions", "after", "after+first"],
)
def test_position_masks_in_a_full_forward(model, tokens, where):
    m, tok = model
    sae = _sae("topk")
    delta = _at_hook(m, tokens, add_feature(m, sae, 7, 3.0, where=where)) - _at_hook(m, tokens)
    changed = delta.abs().amax(-1) > 1e-6
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    expected = torch.ones_like(changed)
    if where.first is not None:
        expected &= pos < where.first
    if where.positions is not None:
        expected &= torch.isin(pos, torch.tensor(where.positions))
    if where.after is not None:
        expected &= torch.isin(tokens, torch.tensor([tok.stoi[c] for c in where.after]))
    # positions before the first steered one are untouched (causal), the steered ones differ by the decoder direction
    first_steered = int(pos[expected].min()) if expected.any() else tokens.shape[1]
    assert not changed[:, :first_steered].any()
    assert changed[expected].all()
    torch.testing.assert_close(delta[expected], (3.0 * sae.W_dec[7]).expand_as(delta[expected]))


def test_position_masks_hold_during_cached_generation(model):
    m, tok = model
    sae = _sae("topk")
    for where in (Where(first=3), Where(positions=(2, 5)), Where(after="e")):
        hooks = add_feature(m, sae, 11, 4.0, where=where) + add_direction(m, HOOK, torch.ones(16), -1.0, where=where)
        s = sample_names(m, tok, SampleSettings(n=12, seed=1), fwd_hooks=hooks, keep_log_probs=True)
        for toks, lps in zip(s.tokens, s.step_log_probs, strict=True):
            full = log_probs(_logits(m, torch.tensor([toks]), hooks))[0, : len(lps)]
            finite = torch.isfinite(lps)
            assert (full[finite] - lps[finite]).abs().max() < 1e-4
        # and the steering did something
        clean = sample_names(m, tok, SampleSettings(n=12, seed=1), fwd_hooks=NOOP_HOOKS, keep_log_probs=True)
        assert any(
            not torch.allclose(a[: min(len(a), len(b))], b[: min(len(a), len(b))])
            for a, b in zip(s.step_log_probs, clean.step_log_probs, strict=True)
        )


def test_rotary_models_read_positions_from_attention(tiny_transformer_dir):
    from training.tokenizer import CharTokenizer
    from training.transformer import build_model

    tok = CharTokenizer.load(tiny_transformer_dir / "tokenizer")
    cfg = {
        "n_layers": 1,
        "d_model": 16,
        "n_heads": 2,
        "d_head": 8,
        "d_mlp": 32,
        "d_vocab": tok.vocab_size,
        "n_ctx": 24,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "positional_embedding_type": "rotary",
        "default_prepend_bos": True,
        "tokenizer_prepends_bos": False,
        "seed": 0,
    }
    m = build_model(cfg, tiny_transformer_dir / "tokenizer")
    d = torch.randn(16)
    hooks = add_direction(m, "blocks.0.hook_resid_mid", d, 5.0, where=Where(first=2))
    s = sample_names(m, tok, SampleSettings(n=6, seed=0), fwd_hooks=hooks, keep_log_probs=True)
    for toks, lps in zip(s.tokens, s.step_log_probs, strict=True):
        full = log_probs(_logits(m, torch.tensor([toks]), hooks))[0, : len(lps)]
        finite = torch.isfinite(lps)
        assert (full[finite] - lps[finite]).abs().max() < 1e-4
    with pytest.raises(VillesError, match="before the model's positions"):
        add_direction(m, "blocks.0.hook_resid_pre", d, 1.0, where=Where(first=2))


def test_bad_inputs(model):
    m, _ = model
    sae = _sae("topk")
    with pytest.raises(VillesError, match="out of range"):
        clamp_feature(m, sae, 48, 1.0)
    with pytest.raises(VillesError, match="out of range"):
        clamp_feature(m, sae, -1, 1.0)
    with pytest.raises(VillesError, match="out of range"):
        clamp_neuron(m, "blocks.0.mlp.hook_post", 32, 1.0)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(VillesError, match="finite"):
            add_feature(m, sae, 1, bad)
    with pytest.raises(VillesError, match="outside the context"):
        add_feature(m, sae, 1, 1.0, where=Where(positions=(m.cfg.n_ctx,)))
    with pytest.raises(VillesError, match="outside the context"):
        add_feature(m, sae, 1, 1.0, where=Where(first=0))
    with pytest.raises(VillesError, match="unknown hook"):
        add_direction(m, "blocks.9.hook_resid_post", torch.ones(16), 1.0)
    with pytest.raises(VillesError, match="does not fit"):
        add_direction(m, HOOK, torch.ones(5), 1.0)
    with pytest.raises(VillesError, match="non-zero"):
        add_direction(m, HOOK, torch.zeros(16), 1.0)
    with pytest.raises(VillesError, match="unknown steering operation"):
        Edit("multiply", 2.0)
    with pytest.raises(VillesError, match="mismatch"):
        clamp_feature(m, _sae("topk", d_in=8), 1, 1.0)
    with pytest.raises(VillesError):
        parse_edits(clamp=["3"])
    with pytest.raises(VillesError, match="twice"):
        parse_edits(clamp=["3=1"], add=["3=2"])


def test_effect_report(model, tiny_corpus):
    m, tok = model
    sae = _sae("topk")
    nothing = effect_report(m, tok, tiny_corpus, add_feature(m, sae, 2, 0.0), n=30, seed=3)
    assert nothing.names_steered == nothing.names_base
    assert abs(nothing.cost) < 1e-9 and abs(nothing.kl) < 1e-9
    assert nothing.rates_base == nothing.rates_steered
    strong = effect_report(m, tok, tiny_corpus, add_feature(m, sae, 2, 8.0), n=30, seed=3)
    assert strong.names_steered != strong.names_base and strong.kl > 0.01
    assert set(strong.to_dict()) >= {"cost", "kl", "rates_base", "rates_steered", "novelty_steered"}
    rows = strong.table()
    assert any(r["measure"] == "hyphen" for r in rows)
    # a sweep is these reports, one per strength, against one unsteered sample
    from interp.steering import strength_sweep

    sweep = strength_sweep(m, tok, tiny_corpus, lambda a: add_feature(m, sae, 2, a), [0.0, 8.0], n=30, seed=3)
    assert [r.names_steered for r in sweep] == [nothing.names_steered, strong.names_steered]
    assert [r.cost for r in sweep] == pytest.approx([nothing.cost, strong.cost], abs=1e-9)


def test_catalogue_steers_labelled_features_and_keeps_one_row_per_property(model, tiny_corpus):
    from interp.steering import PROPERTY_CONCEPTS, steering_catalogue

    m, tok = model
    sae = _sae("topk")
    # labels as the monosemanticity rows give them: feature 2 reads hyphens, feature 5 the first letter "s"
    rows = [
        {"kind": "feature", "hook": HOOK, "index": 2, "concept": "char=-", "mono1": 0.9, "flags": ""},
        {"kind": "feature", "hook": HOOK, "index": 5, "concept": "last2=^s", "mono1": 0.8, "flags": ""},
    ]
    mean_on = torch.full((sae.cfg.d_sae,), 3.0)
    kw = {"n": 40, "seed": 1, "budget": 10.0, "min_novelty": 0.0}
    out = steering_catalogue(m, tok, tiny_corpus, sae, rows, mean_on, **kw)
    assert out and {r["feature"] for r in out} <= {2, 5}
    assert len({r["property"] for r in out}) == len(out) and len({r["feature"] for r in out}) == len(out)
    assert all(r["property"] in PROPERTY_CONCEPTS for r in out)
    effects = [abs(float(r["effect"].split()[0])) for r in out]
    assert effects == sorted(effects, reverse=True) and effects[0] > 0
    assert out == steering_catalogue(m, tok, tiny_corpus, sae, rows, mean_on, **kw)  # seeded
    # nothing is kept when no steering fits the budget
    assert steering_catalogue(m, tok, tiny_corpus, sae, rows, mean_on, **{**kw, "budget": -1.0}) == []


# --- command line -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "sae"
    _sae("topk").save_model(out)
    return out


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_steer(capsys, tiny_transformer_dir, sae_dir):
    args = ("steer", "--checkpoint", tiny_transformer_dir, "--sae", sae_dir, "--n", "20", "--seed", "0")
    code, out, _ = _run(capsys, *args, "--clamp", "3=4", "--add", "5=2", "--ablate", "7", "--json")
    assert code == 0
    report = json.loads(out)
    assert len(report["names_steered"]) == 20 and "cost" in report
    code, out, _ = _run(capsys, *args, "--ablate", "7=mean", "--first", "3")
    assert code == 0 and "unsteered" in out and "hyphen" in out
    again = _run(capsys, *args, "--clamp", "3=4", "--add", "5=2", "--ablate", "7", "--json")[1]
    assert json.loads(again) == report  # seeded


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--clamp", "48=1"], "out of range"),
        (["--clamp", "3=nan"], "finite"),
        (["--add", "3=inf"], "finite"),
        (["--clamp", "x=1"], "integer"),
        (["--positions", "0,99"], "outside the context"),
        (["--first", "0", "--clamp", "3=1"], "outside the context"),
        (["--region", "Atlantis"], "unknown region"),
        (["--ablate", "3=half"], "zero or mean"),
        ([], "nothing to steer"),
    ],
)
def test_cli_steer_bad_input(capsys, tmp_path, monkeypatch, tiny_transformer_dir, sae_dir, bad, message):
    monkeypatch.chdir(tmp_path)
    argv = ["steer", "--checkpoint", tiny_transformer_dir, "--sae", sae_dir, "--n", "5", *bad]
    if bad and bad[0] == "--positions":
        argv += ["--clamp", "3=1"]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and out == ""
    assert list(tmp_path.iterdir()) == []


def test_cli_region_steering(capsys, monkeypatch, tiny_transformer_dir, sae_dir):
    import interp.regions

    class Everywhere:  # stands in for the region classifier (training it takes a minute)
        def is_region(self, names, region):
            return [True] * len(names)

    monkeypatch.setattr(interp.regions, "cached_classifier", lambda corpus: Everywhere())
    argv = ["steer", "--checkpoint", tiny_transformer_dir, "--region", "Bretagne", "--method", "diff-of-means"]
    code, out, _ = _run(capsys, *argv, "--alpha", "2", "--first", "3", "--n", "8", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["rates_steered"]["region: Bretagne"] == 1.0 and len(report["names_steered"]) == 8
    code, _, err = _run(capsys, "steer", "--checkpoint", tiny_transformer_dir, "--region", "Bretagne", "--first", "2")
    assert code == 2 and "fitted" in err
    argv = ["steer", "--checkpoint", tiny_transformer_dir, "--sae", sae_dir, "--region", "Bretagne", "--n", "6"]
    code, out, _ = _run(capsys, *argv, "--method", "sae-add", "--alpha", "2", "--json")
    assert code == 0 and json.loads(out)["rates_steered"]["region: Bretagne"] == 1.0
    code, out, _ = _run(capsys, *argv, "--method", "probe", "--hook", "all", "--json")
    assert code == 0 and len(json.loads(out)["names_steered"]) == 6
