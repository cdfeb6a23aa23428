import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(1)  # deterministic and fair on a 2-core machine


@pytest.fixture(scope="session")
def corpus():
    from training.data import load_communes

    return load_communes()


@pytest.fixture(scope="session")
def tiny_names_file(tmp_path_factory, corpus):
    """~400 real names (all splits represented), as a plain names file."""
    path = tmp_path_factory.mktemp("names") / "tiny.txt"
    path.write_text("\n".join(corpus.names[::90]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tiny_names_file):
    from training.data import load_names_file

    return load_names_file(tiny_names_file)


TINY_TRANSFORMER = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_mlp": 32}


@pytest.fixture(scope="session")
def tiny_transformer_dir(tmp_path_factory, tiny_corpus):
    """A 1-layer d_model 16 HookedTransformer trained for 60 steps on the tiny corpus: a real checkpoint folder."""
    from training.lm import TrainSettings
    from training.neural import train_to_folder

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    settings = TrainSettings(steps=60, batch_size=16, lr=1e-2, warmup=5, eval_every=20, patience=100, dropout=0.1)
    train_to_folder("transformer", TINY_TRANSFORMER, settings, tiny_corpus, out, progress=False)
    return out


@pytest.fixture
def villes_cli(capsys):
    """Run the `villes` command in process: run(*argv) -> (exit status, stdout, stderr); argparse's own exits (bad
    flags) count as statuses too."""
    from training.cli import main

    def run(*argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def tiny_topk_sae_dir(tmp_path_factory, tiny_transformer_dir):
    """A TopK SAE (64 latents, k 4) trained on the tiny transformer's last residual stream for 40k tokens: a SAELens
    folder."""
    from training.sae import SAESettings, train_sae_to_folder

    out = tmp_path_factory.mktemp("topk_sae") / "sae"
    settings = SAESettings(arch="topk", d_sae=64, k=4, tokens=40_000, batch_size=512)
    train_sae_to_folder(tiny_transformer_dir, settings, out, progress=False)
    return out
