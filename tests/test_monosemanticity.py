"""Concept bank and monosemanticity scores: planted units score as they must, bank order is irrelevant, the fast
paths agree with the plain ones, the controls and the command run end to end, bad input exits 2 and writes nothing."""

import json
import math

import pytest
import torch

from interp.concepts import BankSettings, ConceptLabels, build_bank
from interp.monosemanticity import (
    FORMAT,
    MonoSettings,
    Scorer,
    UnitSet,
    _pearson,
    _plain_topk,
    load_or_train_control_sae,
    monosemanticity,
    random_directions,
    read_rows,
    sae_units,
    score,
    summarize,
    units_for,
)
from training.errors import VillesError

NAMES = ["saint-martin", "la chapelle", "l'isle-adam", "abbeville", "saint-jean", "marseille"]
REGIONS = ["Bretagne", "Bretagne", "Île-de-France", "Hauts-de-France", "Bretagne", ""]


# --- the bank ---------------------------------------------------------------------------------------------------------
def small_bank():
    settings = BankSettings(char_min=0, ngram_min=0, word_min=0, affix_min=0.2, region_min_names=1, min_rows=1)
    return build_bank(NAMES, REGIONS, settings)


def test_bank_rows_are_the_characters_and_labels_read_the_text_so_far():
    bank = small_bank()
    dense, ids = bank.labels.dense(), bank.labels.ids
    assert bank.n_positions == sum(map(len, NAMES)) and dense.shape == (bank.n_positions, len(ids))
    text = "".join(NAMES)
    col = {c: dense[:, i] for i, c in enumerate(ids)}
    col.update({alias: col[kept] for alias, kept in bank.aliases.items()})  # identical rows are kept once
    for row, ch in enumerate(text):
        name, i = int(bank.name_ids[row]), int(bank.char_index[row])
        assert NAMES[name][i] == ch
        assert col[f"char={ch.replace(' ', '␣')}"][row]  # the token at the position itself
        prev = NAMES[name][i - 1] if i else "^"
        assert col[f"prev={prev.replace(' ', '␣')}"][row]
    # "saint" is a word in two names: exactly its 10 characters; "l'isle-adam": a first letter after each separator
    assert col["word=saint"].sum() == 10 and col["word=saint"][:5].all() and not col["word=saint"][5]
    start = sum(map(len, NAMES[:2]))
    assert col["boundary=word_initial"][start : start + 11].nonzero().squeeze(1).tolist() == [0, 2, 7]
    assert col["boundary=after_separator"][start : start + 11].nonzero().squeeze(1).tolist() == [2, 7]
    assert bank.aliases["position=0"] == "prev=^"  # identical rows are kept once
    regions = col["region=Bretagne"]
    assert int(regions.sum()) == len("saint-martin") + len("la chapelle") + len("saint-jean")
    assert bank.name_labels.ids == ("region=Bretagne", "region=Hauts-de-France", "region=Île-de-France")
    assert bank.name_labels.dense()[5].sum() == 0  # a name without region has no name-level label


def test_words_and_affixes_are_chosen_by_frequency_overall_or_in_one_region():
    # "plou-" is 12 of Bretagne's 24 words but 12 of 224 overall; "-ville" is frequent everywhere; "kerbras" once
    breton = [f"plou{c}{d}" for c in "abcdef" for d in "gh"] + [f"tré{c}{d}" for c in "ijklmn" for d in "op"]
    other = [f"{c}{d}ville" for c in "abcdefghij" for d in "abcdefghij"] + [
        f"mar{c}{d}" for c in "qrstuvwxyz" for d in "abcdefghij"
    ]
    names = breton + other + ["kerbras"]
    regions = ["Bretagne"] * len(breton) + ["Normandie"] * (len(other) + 1)
    settings = BankSettings(affix_min=0.1, region_affix_min=0.3, region_min_names=20)
    ids = set(build_bank(names, regions, settings).labels.ids)
    assert {"prefix=plou-", "suffix=-ville", "prefix=mar-"} <= ids and "prefix=ker-" not in ids
    assert "prefix=plou-" not in build_bank(names, None, settings).labels.ids  # without regions: too rare overall
    words = ["san pietro"] * 12 + [f"{c}{d}ville" for c in "abcdefghij" for d in "abcdefghij"]
    bank = build_bank(words, ["Corse"] * 12 + ["Grand Est"] * 100, BankSettings(word_min=0.2, region_min_names=10))
    assert {"word=san", "word=pietro"} <= set(bank.labels.ids)


def test_labels_round_trip_through_dense_and_select():
    labels = small_bank().labels
    back = ConceptLabels.from_dense(labels.dense(), labels.ids, labels.families)
    assert torch.equal(back.dense(), labels.dense())
    order = list(reversed(range(labels.n_concepts)))
    picked = labels.select(order)
    assert picked.ids == tuple(reversed(labels.ids)) and torch.equal(picked.dense(), labels.dense()[:, order])


def test_bank_bad_input():
    with pytest.raises(VillesError, match="no names"):
        build_bank([])
    with pytest.raises(VillesError, match="empty name"):
        build_bank(["a", ""])
    with pytest.raises(VillesError, match="regions"):
        build_bank(["a", "b"], ["x"])
    with pytest.raises(VillesError, match="fraction"):
        build_bank(["a"], settings=BankSettings(char_min=2))
    with pytest.raises(VillesError, match="twice"):
        ConceptLabels(("a", "a"), ("f", "f"), torch.zeros(3, 1, dtype=torch.int32))


# --- scores of planted units ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bank(corpus):
    """About 400 real names with their regions (the tiny names file has no metadata)."""
    communes = corpus.communes[::90]
    return build_bank([c.name for c in communes], [c.region for c in communes], BankSettings(region_min_names=5))


def planted(bank):
    """[rows, 5] units: an exact detector of word=saint, a unit firing on two unrelated, equally frequent concepts
    (char=b, char=g), Gaussian noise, a dead unit and an always-on unit."""
    dense = bank.labels.dense().float()
    col = {c: dense[:, i] for i, c in enumerate(bank.labels.ids)}
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(bank.n_positions, generator=gen)
    dead = torch.zeros(bank.n_positions)
    dead[:3] = 1.0
    return torch.stack([2 * col["word=saint"], col["char=b"] + col["char=g"], noise, dead, 1 + noise.abs()], 1)


def test_planted_units_score_as_they_must(bank):
    rows = score(planted(bank), bank.labels, bank.name_ids, name_labels=bank.name_labels)
    detector, union, noise, dead, dense = rows
    assert detector["concept"] == "word=saint" and detector["mono1"] > 0.99 and detector["mono2"] == 1.0
    assert detector["r"] > 0.99 and detector["mass_share"] == 1.0 and detector["lift"] > 5
    assert union["concept"] in ("char=b", "char=g") and union["mono1"] < 0.8
    assert set(union["union"].split(" | ")) >= {"char=b", "char=g"} and union["mono2"] < 0.8
    assert noise["mono1"] < 0.5 and abs(noise["r"]) < 0.15 and noise["lift"] < 1.5
    assert noise["flags"] == dense["flags"] == "dense" and dead["flags"] == "dead"
    assert detector["flags"] == union["flags"] == ""
    assert [r["index"] for r in rows] == list(range(5)) and all(r["name_concept"] for r in rows)
    assert units_for(rows, "word=saint", kind="unit") == [detector]
    assert units_for(rows, detector["name_concept"], kind="unit", level="name")[0]["name_concept"]
    summary = summarize(rows)
    assert summary[0]["units"] == 5 and summary[0]["dead"] == 1 and summary[0]["dense"] == 2
    assert summary[0]["scored"] == 2


def test_dictionary_directions_score_high_and_random_directions_low(bank):
    """A 32-d space holding 16 concept detectors (characters, words) along orthonormal directions plus a dense
    Gaussian background (σ 0.2 per dimension): each dictionary direction reads its concept back (Mono1 ≈ 1, Mono2 1), a
    random unit direction mixes several (low Mono1, and Mono2 < 1: a union of concepts explains it better).
    Without the background a random direction's top tail is its largest-weight concept alone (Mono1 ≈ 1 as well):
    then only the mass share and r tell it apart."""
    labels = bank.labels
    counts = labels.counts()
    fams = ("char", "word")
    pick = [i for i in range(labels.n_concepts) if labels.families[i] in fams and 40 <= int(counts[i]) <= 400][:16]
    assert len(pick) == 16
    gen = torch.Generator().manual_seed(4)
    dictionary = torch.linalg.qr(torch.randn(32, 16, generator=gen))[0]  # orthonormal columns
    strength = 1 + 0.2 * torch.rand(bank.n_positions, 16, generator=gen)
    clean = (labels.dense()[:, pick].float() * strength) @ dictionary.T
    directions = random_directions(32, 48, seed=0)
    for sigma in (0.2, 0.0):
        x = clean + sigma * torch.randn(bank.n_positions, 32, generator=gen)
        units = [UnitSet.projection("dictionary", "", x, dictionary), UnitSet.projection("random", "", x, directions)]
        rows = score(units, labels, bank.name_ids)
        learned = [r for r in rows if r["kind"] == "dictionary"]
        assert [r["concept"] for r in learned] == [labels.ids[i] for i in pick]
        assert min(r["mono1"] for r in learned) > 0.95 and min(r["mono2"] for r in learned) > 0.99
        random = {s["kind"]: s for s in summarize(rows)}["random"]
        if sigma:
            assert random["mono1_all"][1] < 0.5 and random["mono2_all"][1] < 0.8
        assert random["mass_share_all"][1] < 0.4 and random["r_all"][1] < 0.5


def test_bank_order_changes_nothing(bank):
    acts = planted(bank)
    labels = bank.labels
    base = score(acts, labels, bank.name_ids)
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(labels.n_concepts, generator=gen).tolist()
    shuffled = score(acts, labels.dense()[:, perm], bank.name_ids, concept_ids=[labels.ids[i] for i in perm],
                     families=[labels.families[i] for i in perm])  # fmt: skip
    assert shuffled == base


def test_fast_paths_agree_with_plain_ones(bank):
    acts = planted(bank)[:, :3]
    merged = score(acts, bank.labels, bank.name_ids, settings=MonoSettings(joint_classes=4096))
    per_slot = score(acts, bank.labels, bank.name_ids, settings=MonoSettings(joint_classes=1))
    assert merged == per_slot
    scorer = Scorer(bank.labels, bank.name_ids)
    ordered = UnitSet.dense("unit", "", acts.index_select(0, scorer.order))
    ordered.ordered = True
    assert score(ordered, bank.labels, bank.name_ids, scorer=scorer) == merged
    # non-negative units given by their entries (as SAE latents are) score as their dense matrix does
    nonneg = planted(bank)[:, [0, 1, 3, 4]]
    r, c = nonneg.nonzero(as_tuple=True)
    sparse = UnitSet.sparse("unit", "", r, c, nonneg[r, c], bank.n_positions, 4)
    assert sparse.entries is not None
    kw = {"name_labels": bank.name_labels, "settings": MonoSettings(unit_chunk=3)}
    assert score(sparse, bank.labels, bank.name_ids, **kw) == score(nonneg, bank.labels, bank.name_ids, **kw)
    # chunks scored by one thread or by several: the same rows, in the same order
    one = {"name_labels": bank.name_labels, "settings": MonoSettings(unit_chunk=1, workers=1)}
    three = {"name_labels": bank.name_labels, "settings": MonoSettings(unit_chunk=1, workers=3)}
    assert score(planted(bank), bank.labels, bank.name_ids, **one) == score(
        planted(bank), bank.labels, bank.name_ids, **three
    )
    # correlation from the entries of a non-negative unit = the dense formula
    x = torch.relu(torch.randn(2000, 3, generator=torch.Generator().manual_seed(2)))
    lab = torch.rand(2000, 3, generator=torch.Generator().manual_seed(3)) < 0.3
    u = torch.arange(3).repeat(2000)
    flat_x, flat_lab = x.reshape(-1), lab.reshape(-1)
    keep = flat_x > 0
    fast = _pearson(u[keep], flat_x[keep].double(), flat_lab[keep], lab.sum(0), 2000, 3)
    plain = torch.tensor([torch.corrcoef(torch.stack([x[:, i], lab[:, i].float()]))[0, 1] for i in range(3)])
    assert torch.allclose(fast.float(), plain, atol=1e-5)


def test_scoring_bad_input(bank):
    acts = planted(bank)
    with pytest.raises(VillesError, match="rows"):
        score(acts[:-1], bank.labels, bank.name_ids)
    bad = acts.clone()
    bad[0, 0] = math.nan
    with pytest.raises(VillesError, match="NaN"):
        score(bad, bank.labels, bank.name_ids)
    with pytest.raises(VillesError, match="concept_ids"):
        score(acts, bank.labels.dense(), bank.name_ids)
    with pytest.raises(VillesError, match="two names"):
        score(acts, bank.labels, torch.zeros(bank.n_positions, dtype=torch.long))
    with pytest.raises(VillesError, match="n_thresholds"):
        score(acts, bank.labels, bank.name_ids, settings=MonoSettings(n_thresholds=0))


# --- a model, an SAE, the controls and the command --------------------------------------------------------------------
def test_model_sae_and_controls(tiny_transformer_dir, tiny_topk_sae_dir, tiny_corpus, tmp_path):
    from training.sae import load_sae
    from training.transformer import load_model

    model = load_model(tiny_transformer_dir)
    sae = load_sae(tiny_topk_sae_dir, model)
    train = tiny_corpus.split_names("train")
    control, trained = load_or_train_control_sae(model, sae, train, tmp_path / "control", tokens=10_240)
    assert trained and control.cfg.d_sae == 64
    again, trained = load_or_train_control_sae(model, sae, train, tmp_path / "control", tokens=10_240)
    assert not trained and torch.equal(again.W_enc, control.W_enc)
    with pytest.raises(VillesError, match="another model shape or other SAE settings"):  # a folder named by the user
        load_or_train_control_sae(model, sae, train, tmp_path / "control", tokens=20_480, reuse_any=True)
    names = tiny_corpus.names
    x = torch.randn(3000, model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    fast, plain = sae_units("f", sae, x, chunk=1000), sae_units("f", sae, x, chunk=1000, fast=False)
    assert _plain_topk(sae) == 4 and torch.equal(fast.chunk(0, 64), plain.chunk(0, 64))  # TopK shortcut = encode
    report = monosemanticity(model, sae, names, [c.region for c in tiny_corpus.communes], control_sae=control)
    kinds = {}
    for r in report.rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    d, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    assert kinds == {"feature": 64, "neuron": d_mlp, "residual": 2 * d, "random_direction": 2 * d,
                     "neuron_topk": d_mlp, "random_model_feature": 64}  # fmt: skip
    assert report.info["positions"] == sum(map(len, names))
    assert {s["kind"] for s in report.summary} == set(kinds)


def test_command_writes_its_folder_and_reuses_the_control(
    villes_cli, tiny_transformer_dir, tiny_topk_sae_dir, tmp_path
):
    out = tmp_path / "mono"
    args = ("monosemanticity", "--checkpoint", tiny_transformer_dir, "--sae", tiny_topk_sae_dir, "--out", out,
            "--control-tokens", 10240)  # fmt: skip
    code, stdout, _ = villes_cli(*args)
    assert code == 0 and "Mono1" in stdout and "random_model_feature" in stdout
    for name in ("units.csv", "units.json", "summary.json", "summary.txt", "concepts.json", "figures.html"):
        assert (out / name).is_file()
    assert (out / "control_sae" / "cfg.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == FORMAT and summary["control_sae_trained_now"]
    rows = read_rows(out)
    assert rows[0]["kind"] == "feature" and rows[0]["index"] == 0
    code, stdout, _ = villes_cli(*args, "--json")
    assert code == 0 and json.loads(stdout)["control_sae_trained_now"] is False


def test_command_bad_input_exits_2_and_writes_nothing(villes_cli, tiny_transformer_dir, tiny_topk_sae_dir, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    wide = tmp_path / "wide_sae"  # an SAE of another model: it reads vectors of 24, the model's are 16
    TopKSAE(
        TopKSAEConfig(d_in=24, d_sae=8, k=2, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post"))
    ).save_model(wide)
    sae = tiny_topk_sae_dir
    cases = [
        ("--checkpoint", tmp_path / "missing", "--no-sae", "--out", tmp_path / "o1"),
        ("--checkpoint", tiny_transformer_dir, "--sae", wide, "--out", tmp_path / "o4"),
        ("--checkpoint", tiny_transformer_dir, "--sae", other, "--out", tmp_path / "o5"),
        ("--checkpoint", tiny_transformer_dir, "--sae", tmp_path / "missing", "--out", tmp_path / "o2"),
        ("--checkpoint", tiny_transformer_dir, "--no-sae", "--out", a_file),
        ("--checkpoint", tiny_transformer_dir, "--no-sae", "--out", other),
        ("--checkpoint", tiny_transformer_dir, "--sae", sae, "--out", tmp_path / "o3", "--control-tokens", 0),
        ("--checkpoint", tiny_transformer_dir, "--out", tiny_transformer_dir, "--no-sae"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for case in cases:
        code, _, err = villes_cli("monosemanticity", *case)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (case, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert a_file.read_text() == "keep me" and sorted(p.name for p in other.iterdir()) == ["notes.txt"]
