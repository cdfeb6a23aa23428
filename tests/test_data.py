import pytest

from training.data import COMMUNES_TSV, load_communes, load_names_file, split_of
from training.errors import VillesError


def test_shipped_table_has_expected_rows(corpus):
    lines = COMMUNES_TSV.read_text(encoding="utf-8").splitlines()
    kinds = [line.split("\t")[2] for line in lines[1:]]
    assert kinds.count("current") == 34_969
    assert kinds.count("delegated") + kinds.count("associated") == 2_576
    assert "arrondissement" not in " ".join(set(kinds))
    assert len(corpus.names) == len(set(corpus.names)) > 34_000


def test_split_is_80_10_10_and_disjoint(corpus):
    sizes = {s: len(corpus.split(s)) for s in ("train", "val", "test")}
    total = sum(sizes.values())
    assert total == len(corpus.names)
    assert abs(sizes["train"] / total - 0.8) < 0.01 and abs(sizes["val"] / total - 0.1) < 0.01
    assert not set(corpus.split_names("train")) & set(corpus.split_names("val"))
    assert not set(corpus.split_names("val")) & set(corpus.split_names("test"))


def test_split_is_stable_when_rows_are_added(tmp_path, corpus):
    base = corpus.names[:500]
    (tmp_path / "a.txt").write_text("\n".join(base), encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(["zzz-nouvelle-commune", *base[::-1], "autre"]), encoding="utf-8")
    a, b = load_names_file(tmp_path / "a.txt"), load_names_file(tmp_path / "b.txt")
    for s in ("train", "val", "test"):
        assert set(a.split_names(s)) <= set(b.split_names(s))
    # case and surrounding space do not move a name
    assert split_of("Saint-Malo ") == split_of("saint-malo")


def test_keep_case_and_metadata():
    cased = load_communes(lowercase=False)
    assert "Saint-Malo" in cased.name_set
    malo = next(c for c in cased.communes if c.name == "Saint-Malo")
    assert malo.region == "Bretagne" and malo.department == "35" and malo.population > 40_000


def test_names_file_errors(tmp_path):
    with pytest.raises(VillesError, match="cannot read"):
        load_names_file(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(VillesError, match="cannot read"):
        load_names_file(tmp_path / "bin.txt")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(VillesError, match="no names"):
        load_names_file(tmp_path / "empty.txt")
