"""Activation store and dashboards: the store against brute force, the causal panels against direct computation,
the folder, the command and its bad input, and (marked browser; skipped without Chromium) the pages in a browser."""

import dataclasses
import json
import math
import re
import shutil
import subprocess

import pytest
import torch

from interp.activations import (
    Collector,
    StoreSettings,
    UnitEdit,
    _Accumulator,
    _Reservoir,
    collect,
    direction_units,
    feature_units,
    neuron_units,
    pearson,
    prefetch,
)
from interp.dashboards import (
    DashboardSettings,
    ablation_effects,
    causal_panels,
    dashboards,
    generate,
    parse_units,
    resolve_labels,
    unit_sets_for,
)
from training.cli import main
from training.errors import VillesError
from training.tokenizer import EOS_ID

SMALL = StoreSettings(batch_size=37, top_k=5, n_bands=4, per_band=3, n_random=4, hist_bins=8, corr_every=1)
FAST = DashboardSettings(
    store=StoreSettings(top_k=4, n_bands=3, per_band=2, n_random=3, hist_bins=6),
    n_effect=3,
    n_generate=2,
    n_neighbours=3,
)


def label_rows(d_sae=32, hook="blocks.0.hook_resid_post"):
    """interp.monosemanticity's rows (the fields the slot reads): every feature of a d_sae SAE (scored or not), a
    neuron, two residual rows (+e_2 and -e_2 when d = 16) and a control, which the slot leaves out."""
    row = {"kind": "feature", "hook": hook, "concept": None, "mono1": None}
    rows = [{**row, "index": i} for i in range(d_sae)]
    rows[0].update(concept="char=a", mono1=0.812)
    return rows + [
        {"kind": "neuron", "hook": "blocks.0.mlp.hook_post", "index": 3, "concept": "prev=<bos>", "mono1": 0.5},
        {"kind": "residual", "hook": "blocks.0.hook_resid_post", "index": 2, "concept": "pos=1", "mono1": 0.25},
        {"kind": "residual", "hook": "blocks.0.hook_resid_post", "index": 18, "concept": "pos=2", "mono1": 0.3},
        {"kind": "random_direction", "hook": hook, "index": 0, "concept": "char=b", "mono1": 0.1},
    ]


LABEL_ROWS = label_rows()


NP_FIELDS = {
    "feature_index",
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
    "neg_str",
    "neg_values",
    "pos_str",
    "pos_values",
    "frac_nonzero",
    "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "n_prompts_total",
    "n_tokens_in_prompt",
    "dataset",
    "decoder_weights_dist",
    "activations",
}  # SAE-Dashboard's NeuronpediaDashboardFeature.to_dict()


@pytest.fixture(scope="module")
def tiny(tiny_transformer_dir):
    from training.neural import load_checkpoint

    model, tok, _ = load_checkpoint(tiny_transformer_dir)
    return model, tok


def make_sae(d_in=16, d_sae=32, k=4, hook="blocks.0.hook_resid_post", arch="topk", seed=0, **meta):
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    metadata = SAEMetadata(hook_name=hook, **meta)
    if arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=metadata))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    return sae.eval()


def regions_for(names):
    return ["Bretagne" if i % 3 == 0 else "Corse" if i % 3 == 1 else "" for i in range(len(names))]


@torch.no_grad()
def brute(model, tok, names, s):
    """Each name's activations [len, units], computed one obvious way."""
    tokens = tok.batch(names)
    _, cache = model.run_with_cache(tokens, names_filter=s.hook)
    return [s.read(cache[s.hook][i, 1 : 1 + len(n)]) for i, n in enumerate(names)]


# --- the store -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_store_matches_brute_force(tiny, tiny_corpus, arch):
    model, tok = tiny
    names = tiny_corpus.names
    regions = regions_for(names)
    sets = [
        feature_units(model, make_sae(arch=arch)),
        neuron_units(model, 0),
        direction_units(model, "blocks.0.hook_resid_post"),
    ]
    store = collect(model, sets, names, regions, SMALL, progress=False)
    assert getattr(sets[0], "_topk", False) is (arch == "topk")  # TopK codes read from the encoder's top k
    neurons_all = torch.cat(brute(model, tok, names, neuron_units(model, 0)))
    for s in sets:
        st = store[s.id]
        per_name = brute(model, tok, names, s)
        a = torch.cat(per_name)
        chars = torch.cat([torch.tensor([tok.stoi[c] for c in n]) for n in names])
        prev = torch.cat([torch.tensor([1] + [tok.stoi[c] for c in n[:-1]]) for n in names])
        pos = torch.cat([torch.arange(1, len(n) + 1) for n in names])
        reg = torch.cat(
            [
                torch.full((len(n),), store.region_names.index(r or "(unknown)"))
                for n, r in zip(names, regions, strict=True)
            ]
        )
        assert st.n_tokens == len(a) and st.n_names == len(names)
        for g, ids in (("char", chars), ("prev", prev), ("pos", pos), ("region", reg)):
            want_sum = torch.zeros_like(getattr(st, f"sum_{g}")).index_add_(0, ids, a)
            want_act = torch.zeros_like(want_sum).index_add_(0, ids, (a > 0).float())
            assert torch.allclose(getattr(st, f"sum_{g}"), want_sum, atol=1e-3, rtol=1e-4), (s.id, g)
            assert torch.equal(getattr(st, f"active_{g}"), want_act), (s.id, g)
            assert torch.equal(getattr(st, f"count_{g}"), torch.bincount(ids, minlength=len(want_sum)).float())
        assert torch.allclose(st.sumsq_char.sum(0), (a * a).sum(0), rtol=1e-4, atol=1e-3)
        assert torch.allclose(st.mass_region.sum(0), a.clamp(min=0).sum(0), rtol=1e-4, atol=1e-3)
        # activations from batches of other shapes differ in the last bits: compare with a tolerance
        assert torch.allclose(st.max, a.amax(0), atol=1e-5)
        assert torch.allclose(st.min, a.amin(0).clamp(max=0) if s.kind == "feature" else a.amin(0), atol=1e-5)
        peaks = torch.stack([x.amax(0) for x in per_name])  # [names, units]
        assert torch.equal(st.active_names, (peaks > 0).sum(0).float())
        for u in range(len(s)):
            kept = st.top.key[u][torch.isfinite(st.top.key[u])].float()
            want = peaks[:, u][peaks[:, u] > 0].sort(descending=True).values[: SMALL.top_k]
            assert torch.allclose(-kept, want, atol=1e-5)
            for k in range(len(kept)):  # each kept example carries its name's real activations
                name = int(st.top.name[u, k])
                assert torch.allclose(st.top.vec[u, k, : len(names[name])], per_name[name][:, u], atol=1e-5)
                assert abs(float(peaks[name, u]) + float(kept[k])) < 1e-5
        if s.signed:
            lows = torch.stack([x.amin(0) for x in per_name])
            kb = st.bottom.key[torch.isfinite(st.bottom.key)]
            assert len(kb) == sum(min(SMALL.top_k, int((lows[:, u] < 0).sum())) for u in range(len(s)))
            assert torch.allclose(
                st.bottom.key[:, 0].float(),
                torch.where(lows.amin(0) < 0, lows.amin(0), torch.tensor(math.inf)),
                atol=1e-5,
            )
        # ranges: the power of two above the extremes; histograms: the same bins computed directly
        B, NB = SMALL.hist_bins, SMALL.n_bands
        pow2 = lambda x: torch.where(x > 0, torch.exp2(torch.floor(torch.log2(x.clamp(min=1e-30))) + 1), 0 * x)  # noqa: E731
        assert torch.equal(st.range_pos, pow2(st.max))
        if s.kind == "feature":
            r, c = a.nonzero(as_tuple=True)
            bins = (a[r, c] * B / st.range_pos[c]).long().clamp(max=B - 1)
            want = torch.zeros(len(s) * B).index_add_(0, c * B + bins, torch.ones(len(r))).view(len(s), B)
            assert torch.equal(st.hist_pos.sum(1), (a > 0).sum(0).float())
        else:
            assert torch.equal(st.range_neg, pow2(-st.min))
            pos = a >= 0
            bins = (a * B / st.range_pos.clamp(min=1e-30)).long().clamp(max=B - 1)
            want = torch.stack([torch.bincount(bins[pos[:, u], u], minlength=B) for u in range(len(s))]).float()
            nbins = (-a * B / st.range_neg.clamp(min=1e-30)).long().clamp(max=B - 1)
            want_neg = torch.stack([torch.bincount(nbins[~pos[:, u], u], minlength=B) for u in range(len(s))]).float()
            assert (st.hist_neg - want_neg).abs().sum() <= 2 + 0.002 * want_neg.sum()
            assert torch.equal(st.hist_pos.sum(1) + st.hist_neg.sum(1), torch.full((len(s),), float(len(a))))
        assert (st.hist_pos - want).abs().sum() <= 2 + 0.002 * want.sum()  # a value on a bin edge may fall either side
        # bands: counts by peak, and every sampled name lies in its band
        width = st.range_pos / NB
        band = (peaks / width.clamp(min=1e-30)).long().clamp(0, NB - 1)
        for u in range(len(s)):
            fires = peaks[:, u] > 0
            assert (st.band_count[u] - torch.bincount(band[fires, u], minlength=NB).float()).abs().sum() <= 2
            assert st.band_count[u].sum() == fires.sum()
            w = float(width[u])
            for b in range(NB):
                got = st.bands.name[u * NB + b][st.bands.name[u * NB + b] >= 0]
                assert len(got) == min(SMALL.per_band, int(st.band_count[u, b]))
                assert all(b * w - 1e-4 <= peaks[g, u] <= (b + 1) * w + 1e-4 and peaks[g, u] > 0 for g in got.tolist())
            got = st.random.name[u][st.random.name[u] >= 0]
            assert len(got) == min(SMALL.n_random, int(fires.sum())) and len(set(got.tolist())) == len(got)
            assert all(peaks[g, u] > 0 for g in got.tolist())
        # correlations with the neurons (corr_every=1: every row)
        want = torch.corrcoef(torch.cat([a, neurons_all], 1).T)[: len(s), len(s) :]
        want = torch.nan_to_num(want)
        assert torch.allclose(pearson(st.corr), want, atol=2e-3)


def test_store_does_not_depend_on_batch_size(tiny, tiny_corpus):
    model, _ = tiny
    names = tiny_corpus.names
    sets = [feature_units(model, make_sae()), neuron_units(model, 0)]
    a = collect(model, sets, names, None, SMALL, progress=False)
    b = collect(model, sets, names, None, StoreSettings(**{**SMALL.__dict__, "batch_size": 1000}), progress=False)
    for sid in ("sae", "mlp0"):
        x, y = a[sid], b[sid]
        assert torch.allclose(x.top.key, y.top.key, atol=1e-5)
        assert (x.top.name != y.top.name).float().mean() < 0.02  # only near-ties may swap
        # samples are keyed by a hash of (name, unit): the same whatever the batching (but for a peak on a band edge)
        assert (x.bands.name != y.bands.name).float().mean() < 0.02
        assert (x.random.name != y.random.name).float().mean() < 0.02
        assert torch.equal(x.range_pos, y.range_pos)  # powers of two: independent of the batching
        assert (x.hist_pos - y.hist_pos).abs().sum() <= 0.002 * x.hist_pos.sum() + 2
        assert torch.allclose(x.sum_char, y.sum_char, atol=1e-3)


def test_prefetch_keeps_order_and_errors():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise VillesError("broken batch")

    with pytest.raises(VillesError, match="broken batch"):
        list(prefetch(failing()))
    produced = []

    def endless():
        for i in range(10**9):
            produced.append(i)
            yield i

    stream = prefetch(endless(), depth=2)
    assert next(stream) == 0
    stream.close()  # the producer stops, a few items ahead at most
    assert len(produced) <= 5


def test_sparse_and_dense_paths_agree(tiny, tiny_corpus):
    model, _ = tiny
    s = feature_units(model, make_sae(arch="standard"))
    col = Collector(model, [s], tiny_corpus.names, regions_for(tiny_corpus.names), batch_size=50)
    accs = [
        _Accumulator(s, model.cfg.d_vocab, model.cfg.n_ctx, len(col.region_names), col.max_len, SMALL, col.n_neurons)
        for _ in range(2)
    ]
    batches = list(col)
    for b in batches:
        b.neuron_sum, b.neuron_sumsq = b.neurons.sum(0), (b.neurons**2).sum(0)
    for acc, sparse in zip(accs, (True, False), strict=True):
        for b in batches:
            acc.update(b, sparse=sparse)
        acc.finish()
    x, y = accs[0].st, accs[1].st
    for k in (
        "sum_char",
        "sum_prev",
        "sum_pos",
        "sum_region",
        "active_char",
        "active_pos",
        "mass_region",
        "sumsq_char",
        "max",
        "active_names",
        "band_count",
    ):
        assert torch.allclose(getattr(x, k), getattr(y, k), atol=1e-3), k
    assert torch.equal(x.top.name, y.top.name)
    assert torch.equal(x.bands.name, y.bands.name) and torch.equal(x.random.name, y.random.name)
    assert torch.allclose(pearson(x.corr), pearson(y.corr), atol=1e-4)  # corr_every=1: both read every row


def test_reservoir_is_exact():
    g = torch.Generator().manual_seed(1)
    G, S, n = 6, 3, 400
    gid, key = torch.randint(0, G, (n,), generator=g), torch.rand(n, generator=g, dtype=torch.float64)
    payload = torch.arange(n, dtype=torch.float)[:, None]
    res = _Reservoir(G, S, 1)
    for k, chunk in enumerate(torch.randperm(n, generator=g).split(37)):
        if k % 2:  # straight merges and buffered ones give the same result
            res.offer(gid[chunk], key[chunk], chunk, lambda i, chunk=chunk: payload[chunk[i]])
        else:
            res.add(gid[chunk], key[chunk], chunk, payload[chunk])
    res.flush()
    for grp in range(G):
        assert torch.equal(res.key[grp], key[gid == grp].sort().values[:S])
        assert torch.equal(res.vec[grp, :, 0], res.name[grp].float())  # each slot kept its own payload
    # merging groups in pairs (a unit's range doubling) keeps the smallest keys of the union
    res.regroup(torch.arange(G), torch.arange(G) // 2)
    for grp in range(G // 2):
        assert torch.equal(res.key[grp], key[gid // 2 == grp].sort().values[:S])
        assert torch.equal(res.vec[grp, :, 0], res.name[grp].float())
    assert torch.isinf(res.key[G // 2 :]).all()


# --- edits and causal panels -----------------------------------------------------------------------------------------
def test_unit_edit(tiny):
    model, _ = tiny
    sae = make_sae()
    s = feature_units(model, sae)
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[True] * 5, [False, True, True, False, False], [False] * 5])
    units = torch.tensor([2, 7, 2])
    f = sae.encode(x)
    y = UnitEdit(s, units, torch.zeros(3), mask)(x)
    want = x - (f.gather(-1, units[:, None, None].expand(3, 5, 1)) * mask[..., None]) * sae.W_dec[units][:, None]
    assert torch.allclose(y, want, atol=1e-5)
    current = f.gather(-1, units[:, None, None].expand(3, 5, 1))[..., 0]  # the clean values, as the store keeps them
    assert not torch.allclose(UnitEdit(s, units, torch.full((3,), 2.0), mask, current)(x), x, atol=1e-5)
    for value in (0.0, 2.0):
        known = UnitEdit(s, units, torch.full((3,), value), mask, current)
        assert torch.allclose(known(x), UnitEdit(s, units, torch.full((3,), value), mask)(x), atol=1e-5)
    n = neuron_units(model, 0, [3, 9])
    h = torch.randn(3, 5, 32)
    e = UnitEdit(n, torch.tensor([0, 1, 1]), torch.tensor([5.0, -1.0, 2.0]), mask)
    e.rows = torch.tensor([0, 1, 2])
    z = e(h)
    assert torch.equal(z[0, :, 3], torch.full((5,), 5.0)) and torch.equal(z[2], h[2])
    assert torch.equal(z[1, 1:3, 9], torch.full((2,), -1.0)) and torch.equal(z[1, 0], h[1, 0])


def _no_norm_model(tiny_transformer_dir):
    from training.checkpoint import read_json
    from training.transformer import build_model

    cfg = {**read_json(tiny_transformer_dir / "hooked_transformer_config.json"), "normalization_type": None}
    torch.manual_seed(0)
    return build_model(cfg, tiny_transformer_dir / "tokenizer")


def test_logit_effect_equals_raw_path_without_final_norm(tiny, tiny_transformer_dir, tiny_corpus):
    """With no final LayerNorm, the last residual stream maps to logits linearly: the through-model effect of a basis
    direction there must equal its raw row of W_U (centred). With the norm, it must match a direct ablation."""
    _, tok = tiny
    names = tiny_corpus.names[:120]
    for model, exact in ((_no_norm_model(tiny_transformer_dir), True), (tiny[0], False)):
        s = direction_units(model, "blocks.0.hook_resid_post", [0, 5])
        st = collect(model, [s], names, None, SMALL, progress=False)[s.id]
        ablation, through = ablation_effects(model, tok, st, names, 3)
        keep = torch.ones(model.cfg.d_vocab, dtype=torch.bool)
        keep[:2] = False
        raw = s.directions(model) @ model.W_U.detach()
        raw = (raw - raw[:, keep].mean(1, keepdim=True)) * keep
        if exact:
            assert torch.allclose(through, raw, atol=1e-4)
        else:
            assert not torch.allclose(through, raw, atol=1e-2)
        # one example by hand: ablate the direction at every character, compare log-probs
        name_id, delta = ablation[0][0]
        tokens = tok.batch([names[name_id]])
        torch.set_grad_enabled(False)
        lp = torch.log_softmax(model(tokens).masked_fill(~keep, -math.inf), -1)

        def zero(x, hook):
            x = x.clone()
            x[:, 1:-1, 0] = 0
            return x

        lp2 = torch.log_softmax(
            model.run_with_hooks(tokens, fwd_hooks=[(s.hook, zero)]).masked_fill(~keep, -math.inf), -1
        )
        tgt = tokens[0, 1:]
        want = lp[0, :-1].gather(-1, tgt[:, None])[:, 0] - lp2[0, :-1].gather(-1, tgt[:, None])[:, 0]
        assert torch.allclose(torch.tensor(delta), want, atol=1e-4)
        torch.set_grad_enabled(True)
        assert abs(float(want[0])) < 1e-6  # the first letter is predicted at <bos>, which is never ablated


def test_ablation_from_the_hooks_block_matches_a_full_run(tiny_transformer_dir, tiny_corpus):
    """Units in block 1 are ablated from block 1's input (the blocks before cannot change): same as a full run."""
    from training.checkpoint import read_json
    from training.tokenizer import CharTokenizer
    from training.transformer import build_model

    cfg = {**read_json(tiny_transformer_dir / "hooked_transformer_config.json"), "n_layers": 2}
    torch.manual_seed(1)
    model = build_model(cfg, tiny_transformer_dir / "tokenizer")
    tok = CharTokenizer.load(tiny_transformer_dir / "tokenizer")
    names = tiny_corpus.names[:80]
    for s in (
        neuron_units(model, 1, [2, 3]),
        feature_units(model, make_sae(hook="blocks.1.hook_resid_post"), units=[0, 1]),
        direction_units(model, "blocks.0.hook_resid_post", [1, 4]),  # a block's output: only block 1 runs again
    ):
        st = collect(model, [s], names, None, SMALL, progress=False)[s.id]
        ablation, through = ablation_effects(model, tok, st, names, 2, batch=3)
        u = next(u for u in range(len(s)) if u in ablation)
        name_id, delta = ablation[u][0]
        tokens = tok.batch([names[name_id]])
        edit = UnitEdit(s, torch.tensor([u]), torch.zeros(1), tokens > EOS_ID)
        with torch.no_grad():
            lp = torch.log_softmax(model(tokens)[..., 2:], -1)
            with model.hooks(fwd_hooks=[(s.hook, edit)]):
                lp2 = torch.log_softmax(model(tokens)[..., 2:], -1)
        tgt = (tokens[0, 1:] - 2).clamp(min=0)[:, None]
        want = (lp[0, :-1].gather(-1, tgt) - lp2[0, :-1].gather(-1, tgt))[:, 0]
        assert torch.allclose(torch.tensor(delta), want, atol=1e-4), s.id
        assert torch.isfinite(through[u]).all()


def test_causal_panels_do_not_depend_on_workers(tiny, tiny_corpus):
    model, tok = tiny
    names = tiny_corpus.names[:150]
    sets = [feature_units(model, make_sae(), units=range(6)), neuron_units(model, 0, range(5))]
    store = collect(model, sets, names, None, SMALL, progress=False)
    settings = dataclasses.replace(FAST, generate_batch=12, effect_batch=4)  # a few units per task: many tasks
    (one, direct, base1), (two, _, base2) = (
        causal_panels(model, tok, store, sets, settings, workers=w) for w in (1, 3)
    )
    assert base1 == base2 and len(base1) == settings.n_generate
    for s in sets:
        a, b = one[s.id], two[s.id]
        alive = set((store[s.id].max > 0).nonzero().flatten().tolist())
        assert a.generated == b.generated and a.clamp_values == b.clamp_values and set(a.generated) == alive
        assert a.ablation.keys() == b.ablation.keys() == alive
        for u in a.ablation:
            assert [n for n, _ in a.ablation[u]] == [n for n, _ in b.ablation[u]]
            assert all(
                torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)
                for (_, x), (_, y) in zip(a.ablation[u], b.ablation[u], strict=True)
            )
        assert (
            torch.allclose(a.through, b.through, atol=1e-5, equal_nan=True) and not a.through[list(alive)].isnan().any()
        )
        assert direct[s.id].shape == (len(s), model.cfg.d_vocab)


def test_generate_rows_are_independent(tiny):
    model, tok = tiny
    gen = torch.Generator().manual_seed(0)
    uniforms = torch.rand(6, model.cfg.n_ctx, generator=gen)
    every = generate(model, tok, uniforms, torch.arange(6))
    assert every == generate(model, tok, uniforms, torch.arange(6))
    assert generate(model, tok, uniforms, torch.tensor([3]))[0] == every[3]
    s = neuron_units(model, 0)
    nothing = UnitEdit(
        s, torch.zeros(6, dtype=torch.long), torch.zeros(6), torch.zeros(6, model.cfg.n_ctx, dtype=torch.bool)
    )
    assert generate(model, tok, uniforms, torch.arange(6), nothing) == every
    d = direction_units(model, "blocks.0.hook_resid_post")
    loud = UnitEdit(d, torch.arange(6), torch.full((6,), 50.0))
    assert generate(model, tok, uniforms, torch.arange(6), loud) != every


def test_lean_generation_matches_transformer_lens(tiny, monkeypatch):
    """Clamped sampling on the lean decoder (edits at an MLP's hook_post or the last hook_resid_post) gives the names
    TransformerLens's own forward with the hook gives, row for row, cut names included."""
    import interp.dashboards as dash

    model, tok = tiny
    uniforms = torch.rand(4, model.cfg.n_ctx, generator=torch.Generator().manual_seed(1))
    rows = torch.arange(4).repeat(3)
    neurons = neuron_units(model, 0)
    features = feature_units(model, make_sae())  # on blocks.0.hook_resid_post, the tiny model's last
    edits = [
        None,
        UnitEdit(neurons, torch.arange(12) % 5, torch.linspace(0, 6, 12)),
        UnitEdit(features, torch.arange(12) % 7, torch.linspace(0, 12, 12)),
    ]
    assert all(dash._EditingDecoder.reaches(model, e) for e in edits)
    lean = [generate(model, tok, uniforms, rows, e, max_len=6) for e in edits]
    monkeypatch.setattr(dash._EditingDecoder, "reaches", staticmethod(lambda model, edit: False))
    hooked = [generate(model, tok, uniforms, rows, e, max_len=6) for e in edits]
    assert lean == hooked
    assert any(name.endswith("\u2026") for names in lean for name in names)  # some were cut at 6 characters
    assert lean[1] != lean[0] and lean[2] != lean[0]  # the edits do something


# --- the folder ------------------------------------------------------------------------------------------------------
def page_data(path):
    text = path.read_text(encoding="utf-8")
    m = re.search(r"villesDashboard\.render\((.*)\);</script>", text, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def build(tiny, names, out, sae, units, **kwargs):
    """The dashboards of an SAE's `units` and as many neurons of the tiny model, with the fast settings."""
    model, tok = tiny
    regions = regions_for(names)
    return dashboards(model, sae, out=out, units=units, neurons=True, names=names, regions=regions, settings=FAST,
                      progress=False, tokenizer=tok, **kwargs)  # fmt: skip


def test_dashboards_folder(tiny, tiny_corpus, tmp_path):
    model, tok = tiny
    names = tiny_corpus.names
    out = tmp_path / "dash"
    sae = make_sae(d_sae=24)
    with torch.no_grad():  # one dead feature: never active, never shown as alive
        sae.W_enc[:, 7] = -10.0
        sae.b_enc[7] = -100.0
    r = build(tiny, names, out, sae, range(8), labels=label_rows(24), export="neuronpedia")
    assert r.pages == 16
    assert sorted(p.name for p in (out / "units").iterdir()) == ["mlp0", "sae"]
    assert len(list(out.rglob("plotly.min.js"))) == 1
    for page in out.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert len(text) < 60_000 and "plotly.min.js" in text and "http" not in text.split("<body")[0]
        assert "Plotly.register" not in text  # the library is never inlined
    dead = page_data(out / "units" / "sae" / "7.html")
    assert dead["flags"] == ["dead"] and "top" not in dead and "logits" not in dead
    alive = page_data(out / "units" / "sae" / "0.html")
    assert {
        "top",
        "bands",
        "random",
        "hist",
        "logits",
        "by_char",
        "by_prev",
        "by_pos",
        "regions",
        "ablation",
        "generated",
        "neighbours",
    } <= set(alive)
    assert alive["label"] == "char=a" and alive["score"] == 0.812  # the concept slot, from monosemanticity rows
    assert page_data(out / "units" / "sae" / "1.html")["label"] is None
    assert page_data(out / "units" / "mlp0" / "3.html")["label"] == "prev=<bos>"
    index_rows = {(row[0], row[1]): row for row in page_data(out / "index.html")["rows"]}
    assert index_rows[("sae", 0)][7:9] == ["char=a", 0.812] and index_rows[("sae", 2)][7:9] == [None, None]
    assert len(alive["logits"]["labels"]) == model.cfg.d_vocab - 2 and alive["logits"]["raw"] is not None
    assert set(alive["neighbours"]) == {"cosine", "neurons"}
    assert len(alive["generated"]["names"]) == len(FAST.clamp) and len(alive["generated"]["baseline"]) == 2
    assert set(alive["regions"]["labels"]) == {"Bretagne", "Corse", "(unknown)"}
    neuron = page_data(out / "units" / "mlp0" / "3.html")
    assert "bottom" in neuron and "features:sae" in neuron["neighbours"]
    exported = json.loads((out / "neuronpedia" / "sae" / "0.json").read_text(encoding="utf-8"))
    assert set(exported) == NP_FIELDS
    assert exported["activations"][0]["tokens"][0] == "<bos>" and exported["activations"][0]["bin_min"] == -1
    assert len(exported["pos_str"]) == 10 and 0 < exported["frac_nonzero"] < 1
    manifest = json.loads((out / "dashboards.json").read_text(encoding="utf-8"))
    assert manifest["pages"] == 16 and {s["id"] for s in manifest["sets"]} == {"sae", "mlp0"}
    # an earlier dashboards folder is replaced whole (here through the spelling, interp.dashboards(...))
    import interp

    interp.dashboards(
        model,
        None,
        "blocks.0.hook_resid_post",
        out,
        units=[1],
        names=names[:60],
        settings=FAST,
        progress=False,
        tokenizer=tok,
    )
    assert [p.name for p in (out / "units").iterdir()] == ["blocks.0.hook_resid_post"]
    assert not list(tmp_path.glob(".dash*"))  # no temporary folder left behind


def test_labels(tiny, tmp_path):
    from interp.monosemanticity import sae_fingerprint

    model, _ = tiny
    sae = make_sae()
    sets = unit_sets_for(model, sae, units=range(4), neurons=True)
    want = {("sae", 0): ("char=a", 0.812), ("mlp0", 3): ("prev=<bos>", 0.5)}
    assert resolve_labels(LABEL_ROWS, sets) == want
    (tmp_path / "units.json").write_text(json.dumps(LABEL_ROWS), encoding="utf-8")
    (tmp_path / "summary.json").write_text(json.dumps({"sae_fingerprint": sae_fingerprint(sae)}), encoding="utf-8")
    assert resolve_labels(tmp_path, sets) == want == resolve_labels(tmp_path / "units.json", sets)
    assert resolve_labels({("sae", 2): ("x", 1)}, sets) == {("sae", 2): ("x", 1.0)}
    resid = unit_sets_for(model, hook="blocks.0.hook_resid_post")
    assert resolve_labels(LABEL_ROWS, resid) == {("blocks.0.hook_resid_post", 2): ("pos=1", 0.25)}  # +e_2 only
    other_weights = tmp_path / "other"
    other_weights.mkdir()
    (other_weights / "units.json").write_text(json.dumps(LABEL_ROWS), encoding="utf-8")
    (other_weights / "summary.json").write_text(json.dumps({"sae_fingerprint": "0" * 16}), encoding="utf-8")
    for bad, message in (
        (label_rows(hook="blocks.5.hook_resid_post")[:1], "none of the labels match"),
        (label_rows(16), "another SAE"),  # a report on a 16-latent SAE, shown on a 32-latent one
        (other_weights, "another SAE"),  # same width, other weights (the report's fingerprint)
        (label_rows()[:32] + [dict(LABEL_ROWS[32], index=99)], "out of range"),
        (tmp_path / "missing.json", "no such file"),
        (tmp_path / "nope", "no such file"),
    ):
        with pytest.raises(VillesError, match=message):
            resolve_labels(bad, sets)
    (tmp_path / "bad" / "units.json").parent.mkdir()
    (tmp_path / "bad" / "units.json").write_text("{", encoding="utf-8")
    with pytest.raises(VillesError, match="cannot read"):
        resolve_labels(tmp_path / "bad", sets)


def test_units_beside_an_sae(tiny):
    model, _ = tiny
    sae = make_sae(d_sae=64)
    sets = unit_sets_for(model, sae, units=range(40), neurons=True)
    assert [(s.id, len(s)) for s in sets] == [("sae", 40), ("mlp0", model.cfg.d_mlp)]  # neurons: the indices that fit
    assert [s.id for s in unit_sets_for(model, sae, units=[50], neurons=True)] == ["sae"]
    with pytest.raises(VillesError, match="out of range"):
        unit_sets_for(model, sae, units=[64], neurons=True)
    with pytest.raises(VillesError, match="out of range"):
        unit_sets_for(model, units=[model.cfg.d_mlp])  # neurons alone: every index must exist


def test_parse_units():
    assert parse_units("0-3,7, 5") == [0, 1, 2, 3, 5, 7]
    assert parse_units(None) is None
    for bad in ("a", "3-1", "-2", "1-"):
        with pytest.raises(Exception, match="units|out of range"):
            parse_units(bad)


# --- the command -----------------------------------------------------------------------------------------------------
def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_transformer_dir):
    folder = tmp_path_factory.mktemp("sae") / "sae"
    make_sae().save_model(folder)
    return folder


def test_cli_hook_and_sae(capsys, tmp_path, tiny_transformer_dir, sae_dir):
    out = tmp_path / "d"
    (tmp_path / "units.json").write_text(json.dumps(LABEL_ROWS), encoding="utf-8")
    code, stdout, _ = run(
        capsys,
        "dashboards",
        "--checkpoint",
        tiny_transformer_dir,
        "--hook",
        "blocks.0.mlp.hook_post",
        "--out",
        out,
        "--units",
        "0-3",
        "--split",
        "val",
        "--labels",
        tmp_path / "units.json",
        "--quiet",
    )
    assert code == 0 and "mlp0" in stdout
    assert page_data(out / "units" / "mlp0" / "3.html")["label"] == "prev=<bos>"
    assert sorted(p.name for p in (out / "units" / "mlp0").iterdir()) == ["0.html", "1.html", "2.html", "3.html"]
    code, _, _ = run(
        capsys,
        "dashboards",
        "--checkpoint",
        tiny_transformer_dir,
        "--sae",
        sae_dir,
        "--out",
        out,
        "--units",
        "2,5",
        "--split",
        "val",
        "--export",
        "neuronpedia",
        "--quiet",
    )
    assert code == 0 and sorted(p.name for p in (out / "neuronpedia" / "sae").iterdir()) == ["2.json", "5.json"]


def test_cli_bad_input(capsys, tmp_path, tiny_transformer_dir, sae_dir):
    other = tmp_path / "other_sae"
    make_sae(d_in=24).save_model(other)  # another model's: d_model 24, not 16
    wrong_weights = tmp_path / "wrong_sae"
    make_sae(model_sha256="0" * 64).save_model(wrong_weights)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    wrong_labels = tmp_path / "labels.json"
    wrong_labels.write_text(json.dumps([dict(LABEL_ROWS[32], hook="blocks.0.hook_resid_post")]), encoding="utf-8")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    ck = tiny_transformer_dir
    cases = [
        (["--checkpoint", ck, "--hook", "blocks.0.mlp.hook_post", "--units", "0-999"], "out of range"),
        (["--checkpoint", ck, "--sae", sae_dir, "--units", "32"], "out of range"),
        (["--checkpoint", ck, "--hook", "blocks.7.hook_resid_post"], "unknown hook"),
        (["--checkpoint", ck, "--sae", other], "mismatch"),
        (["--checkpoint", ck, "--sae", wrong_weights], "mismatch"),
        (["--checkpoint", ck, "--sae", tmp_path], "not a SAELens SAE folder"),
        (["--checkpoint", tmp_path / "nope", "--hook", "blocks.0.mlp.hook_post"], "not found"),
        (["--checkpoint", ck, "--hook", "blocks.0.mlp.hook_post", "--units", "x"], "--units"),
        (["--checkpoint", ck, "--hook", "blocks.0.mlp.hook_post", "--labels", wrong_labels], "none of the labels"),
        (["--checkpoint", ck, "--hook", "blocks.0.mlp.hook_post", "--labels", tmp_path / "no"], "no such file"),
    ]
    for args, message in cases:
        out = tmp_path / "never"
        code, _, err = run(capsys, "dashboards", *args, "--out", out, "--quiet")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out.exists()
    for out, message in ((a_file, "is a file"), (foreign, "not a dashboards folder")):
        code, _, err = run(capsys, "dashboards", "--checkpoint", ck, "--hook", "blocks.0.mlp.hook_post", "--out", out)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert a_file.read_text() == "x" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert not list(tmp_path.glob(".*tmp-*"))


# --- in a browser ----------------------------------------------------------------------------------------------------
# Debian's headless `chromium` (CI installs it, see .ci/run). Its command line is enough: --dump-dom gives the page
# after its scripts ran (--virtual-time-budget lets them finish), --enable-logging=stderr prints every console message
# (console.log/error and uncaught exceptions) as an INFO:CONSOLE line, and --screenshot saves a PNG.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chromium(profile, *args, timeout=120):
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",  # its own profile: runs in parallel never share one
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium)")
def test_pages_render_in_chromium(tiny, tiny_corpus, tmp_path):
    model, tok = tiny
    names = tiny_corpus.names
    out = tmp_path / "dash"
    build(tiny, names, out, make_sae(), range(5), labels=LABEL_ROWS)
    profile = tmp_path / "profile"
    index = _chromium(profile, "--dump-dom", (out / "index.html").as_uri())
    page = out / "units" / "sae" / "1.html"  # alive, not dense
    assert page_data(page)["flags"] == [] and page_data(page)["label"] is None
    unit = _chromium(profile, "--dump-dom", page.as_uri())
    for result in (index, unit):
        assert result.returncode == 0, result.stderr[-2000:]
        console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
        assert not console, console  # the pages log nothing: any console message is a fault
    rows = re.findall(r"<tr[^>]*>", index.stdout.split("<tbody>", 1)[1])
    assert len(rows) == 10  # 5 features + 5 neurons, every one drawn
    assert "10 of 10 units" in index.stdout and "char=a" in index.stdout and "0.812" in index.stdout
    assert 'href="units/sae/0.html"' in index.stdout
    plots = unit.stdout.count('class="plot js-plotly-plot"')
    assert plots == 7  # histogram, 2 logit charts, 3 "where it fires" charts, regions
    assert unit.stdout.count('class="main-svg"') >= plots  # plotly drew each one
    assert "not scored yet" in unit.stdout  # the concept slot, empty for this unit
    for target, name in ((out / "index.html", "index.png"), (page, "feature.png")):
        shot = tmp_path / name  # pytest's tmp folder: kept (the last few runs) for a look
        r = _chromium(profile, "--hide-scrollbars", "--window-size=1200,2400", f"--screenshot={shot}", target.as_uri())
        assert r.returncode == 0, r.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
