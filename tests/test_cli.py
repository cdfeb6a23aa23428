"""The `villes` command: outputs, and bad input -> exit status 2, one line on stderr, nothing written."""

import json

import pytest

from training.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_counting_levels(capsys):
    for model in ("uniform", "unigram", "bigram", "ngram"):
        code, out, _ = run(capsys, "generate", "--model", model, "--n", "5", "--seed", "1")
        assert code == 0 and len(out.splitlines()) == 5
    code, out, _ = run(capsys, "generate", "--model", "ngram", "--order", "6", "--n", "4", "--prefix", "saint-")
    assert all(line.startswith("saint-") for line in out.splitlines())
    assert (
        run(capsys, "generate", "--model", "bigram", "--n", "3")[1]
        == run(capsys, "generate", "--model", "bigram", "--n", "3")[1]
    )


def test_eval_json_on_a_names_file(capsys, tiny_names_file):
    code, out, _ = run(
        capsys,
        "eval",
        "--model",
        "ngram",
        "--order",
        "3",
        "--names-file",
        str(tiny_names_file),
        "--split",
        "all",
        "--json",
    )
    result = json.loads(out)
    assert code == 0 and set(result) == {"model", "split", "nll", "n_chars", "n_names"}
    names = tiny_names_file.read_text(encoding="utf-8").splitlines()
    assert result["n_names"] == len(set(names)) and result["n_chars"] == sum(len(n) + 1 for n in set(names))


def test_transformer_generate_and_eval(capsys, tiny_transformer_dir, tiny_names_file):
    code, out, _ = run(
        capsys,
        "generate",
        "--model",
        "transformer",
        "--checkpoint",
        str(tiny_transformer_dir),
        "--n",
        "7",
        "--temperature",
        "0.8",
        "--top-k",
        "10",
    )
    assert code == 0 and len(out.splitlines()) == 7
    code, out, _ = run(
        capsys,
        "eval",
        "--model",
        "transformer",
        "--checkpoint",
        str(tiny_transformer_dir),
        "--names-file",
        str(tiny_names_file),
        "--json",
    )
    assert code == 0 and 0 < json.loads(out)["nll"] < 4


def test_ladder_json(capsys, tiny_names_file, tiny_transformer_dir):
    code, out, _ = run(
        capsys,
        "ladder",
        "--names-file",
        str(tiny_names_file),
        "--order",
        "3",
        "--transformer",
        str(tiny_transformer_dir),
        "--mlp",
        "/nonexistent",
        "--json",
    )
    rows = json.loads(out)
    assert code == 0
    assert [r["model"] for r in rows] == ["uniform", "unigram", "bigram", "ngram (order 3)", "transformer"]
    assert {"level", "model", "params", "train_nll", "val_nll", "novelty", "samples"} <= set(rows[0])
    assert rows[0]["val_nll"] > rows[1]["val_nll"] > rows[2]["val_nll"]


BAD = [
    (["generate", "--model", "ngram", "--prefix", "saint-Ω"], "unknown character"),
    (["generate", "--model", "transformer", "--checkpoint", "{tiny}", "--prefix", "a" * 80], "leaves no room"),
    (["generate", "--model", "ngram", "--order", "-1"], "order"),
    (["generate", "--model", "ngram", "--n", "0"], "--n"),
    (["generate", "--model", "ngram", "--temperature", "0"], "temperature"),
    (["generate", "--model", "ngram", "--temperature", "nan"], "temperature"),
    (["generate", "--model", "transformer", "--checkpoint", "/nonexistent"], "not found"),
    (["generate", "--model", "mlp", "--checkpoint", "{tiny}"], "not mlp"),
    (["eval", "--model", "bigram", "--names-file", "/nonexistent.txt"], "cannot read"),
    (["eval", "--model", "transformer", "--checkpoint", "{tmp}"], "config.json"),
    (["generate", "--model", "gpt"], "invalid choice"),
    (["train", "transformer", "--out", "{tmp}/new", "--names-file", "/nonexistent.txt"], "cannot read"),
    (["train", "transformer", "--out", "{tiny}"], "already holds"),
]


def exit_code(argv) -> int:
    """main's return value, or argparse's exit status for flags it rejects itself."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, tiny_transformer_dir, argv, message):
    argv = [a.replace("{tiny}", str(tiny_transformer_dir)).replace("{tmp}", str(tmp_path)) for a in argv]
    listing = lambda: [sorted(p.name for p in d.rglob("*")) for d in (tmp_path, tiny_transformer_dir)]  # noqa: E731
    before = listing()
    code = exit_code(argv)
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
    assert listing() == before
