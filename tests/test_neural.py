"""The neural rungs: masking, determinism, checkpoints (plain TransformerLens loading, bad folders), resume after a
kill -9, and batched sampling against one-name-at-a-time forward passes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_TRANSFORMER
from training.errors import VillesError
from training.lm import TrainSettings, log_probs, token_nll
from training.mlp import MLP, MLPSettings
from training.neural import load_checkpoint, train_to_folder
from training.sampling import SampleSettings, sample_names
from training.tokenizer import CharTokenizer
from training.transformer import load_model


def _nll_alone_vs_padded(model, tok):
    names = ["ay", "saint-remy-en-bouzemont", "eu"]
    batch = tok.batch(names)
    padded = token_nll(model(batch), batch)
    for i, name in enumerate(names):
        alone = tok.batch([name])
        torch.testing.assert_close(
            padded[i, : alone.shape[1] - 1], token_nll(model(alone), alone)[0], atol=1e-5, rtol=0
        )
        assert (padded[i, alone.shape[1] - 1 :] == 0).all()


def test_padding_never_changes_the_loss(tiny_transformer_dir):
    model, tok, _ = load_checkpoint(tiny_transformer_dir)
    _nll_alone_vs_padded(model, tok)
    mlp = MLP(MLPSettings(context=4, d_embed=8, d_hidden=16, n_hidden=1, d_vocab=tok.vocab_size)).eval()
    _nll_alone_vs_padded(mlp, tok)


def test_mlp_overfits_a_tiny_corpus(tmp_path):
    from training.data import Commune, Corpus

    names = ["abc", "abd", "bca", "cab", "dab", "bad", "acdc", "dcba"] * 2
    corpus = Corpus(tuple(Commune(n) for n in names))
    corpus.split("train")  # all splits by hash; train on every name, check on every name
    s = TrainSettings(steps=400, batch_size=8, lr=1e-2, warmup=10, eval_every=100, patience=100, weight_decay=0.0)
    tok = CharTokenizer.from_names(names)
    model = MLP(MLPSettings(context=4, d_embed=8, d_hidden=64, n_hidden=1, d_vocab=tok.vocab_size))
    from training.lm import evaluate_nll, train_lm

    before = evaluate_nll(model, tok, names)
    train_lm(model, tok, names, names, s, lambda w, m: None, progress=False)
    after = evaluate_nll(model, tok, names)
    assert after[0] / after[1] < 0.5 < before[0] / before[1]  # uniform is ln 5 = 1.61; memorized names ~0.3


def test_training_is_deterministic(tmp_path, tiny_corpus):
    s = TrainSettings(steps=30, batch_size=8, eval_every=10, patience=100, dropout=0.1, ema=0.9)
    for run in ("a", "b"):
        train_to_folder("transformer", TINY_TRANSFORMER, s, tiny_corpus, tmp_path / run, progress=False)
    a, b = load_file(tmp_path / "a/model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "a").glob("state*"))  # resume state is cleared once training completes


def test_plain_transformer_lens_loading(tiny_transformer_dir):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    d = tiny_transformer_dir
    cfg = HookedTransformerConfig(**json.loads((d / "hooked_transformer_config.json").read_text()))
    plain = HookedTransformer(cfg, tokenizer=PreTrainedTokenizerFast.from_pretrained(str(d / "tokenizer")))
    plain.load_state_dict(load_file(d / "model.safetensors"))
    ours = load_model(d)
    tokens = plain.to_tokens("saint-malo")
    torch.testing.assert_close(plain(tokens), ours(tokens))
    assert ours.to_str_tokens("ay") == ["<bos>", "a", "y"]


def test_bad_checkpoint_folders(tmp_path, tiny_transformer_dir):
    import shutil

    with pytest.raises(VillesError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign/config.json").write_text("{}")
    with pytest.raises(VillesError, match="not a villes model checkpoint"):
        load_model(tmp_path / "foreign")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_transformer_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(VillesError, match="missing"):
        load_model(broken)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_transformer_dir, mismatched)
    cfg = json.loads((mismatched / "hooked_transformer_config.json").read_text())
    cfg["d_mlp"] = 48
    (mismatched / "hooked_transformer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(VillesError, match="do not match its config"):
        load_model(mismatched)


def test_resume_after_kill_loses_nothing(tmp_path, tiny_names_file):
    """kill -9 a training run after its first saved state, resume it, and get the uninterrupted run's weights."""
    from training.cli import main

    flags = [
        "--names-file",
        str(tiny_names_file),
        "--n-layers",
        "1",
        "--d-model",
        "16",
        "--n-heads",
        "2",
        "--d-mlp",
        "32",
        "--steps",
        "1500",
        "--eval-every",
        "50",
        "--batch-size",
        "8",
        "--patience",
        "1000",
        "--dropout",
        "0.1",
        "--ema",
        "0.9",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, torch; torch.set_num_threads(1); from training.cli import main; sys.exit(main(sys.argv[1:]))",
            "train",
            "transformer",
            "--out",
            str(killed),
            *flags,
        ],
        env=env,
    )
    deadline = time.time() + 120
    while not (killed / "state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "state.json").exists(), "the run ended before it saved any state"
    assert not json.loads((killed / "config.json").read_text())["metrics"]["complete"]
    assert main(["train", "transformer", "--resume", str(killed)]) == 0
    assert main(["train", "transformer", "--out", str(tmp_path / "straight"), *flags]) == 0
    a, b = load_file(killed / "model.safetensors"), load_file(tmp_path / "straight/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    ma = json.loads((killed / "config.json").read_text())["metrics"]
    mb = json.loads((tmp_path / "straight/config.json").read_text())["metrics"]
    assert ma["steps"] == mb["steps"] == 1500 and ma["val_nll"] == pytest.approx(mb["val_nll"], abs=1e-6)


@pytest.mark.parametrize("path", ["lean", "hooked", "mlp"])
def test_batched_sampling_matches_single_forward(tiny_transformer_dir, path):
    """Each path (lean decoder, TransformerLens forward + KV cache when hooks are on, recompute for the MLP) gives
    the next-letter distributions of a plain forward pass over the finished name."""
    model, tok, _ = load_checkpoint(tiny_transformer_dir)
    hooks = [("hook_embed", lambda x, hook: x)] if path == "hooked" else []
    if path == "mlp":
        torch.manual_seed(0)
        model = MLP(MLPSettings(context=3, d_embed=8, d_hidden=16, n_hidden=1, d_vocab=tok.vocab_size)).eval()
    for prefix in ("", "saint-"):
        settings = SampleSettings(n=64, seed=1, prefix=prefix, batch_size=32)
        samples = sample_names(model, tok, settings, fwd_hooks=hooks, keep_log_probs=True)
        start = len(tok.encode_prefix(prefix)) - 1
        assert len({len(t) for t in samples.tokens}) > 1  # names of several lengths shared a batch
        for tokens, lps in zip(samples.tokens, samples.step_log_probs, strict=False):
            full = log_probs(model(torch.tensor([tokens])))[0, start : start + len(lps)]
            finite = torch.isfinite(full)
            assert torch.equal(finite, torch.isfinite(lps))
            torch.testing.assert_close(full[finite], lps[finite], atol=1e-5, rtol=0)
        assert all(name.startswith(prefix) for name in samples.names)


def test_hooks_fire_while_sampling(tiny_transformer_dir):
    model, tok, _ = load_checkpoint(tiny_transformer_dir)
    calls = []

    def zero_resid(x, hook):
        calls.append(x.shape)
        return torch.zeros_like(x)

    s = SampleSettings(n=50, seed=2)
    plain = sample_names(model, tok, s).names
    steered = sample_names(model, tok, s, fwd_hooks=[("blocks.0.hook_resid_post", zero_resid)], keep_log_probs=True)
    assert calls and steered.names != plain
    first = steered.step_log_probs[0][0]  # a zeroed residual: every step of every name sees one distribution
    assert all(torch.allclose(lp, first.expand_as(lp)) for lp in steered.step_log_probs)


def test_sampling_is_seeded_and_respects_top_k(tiny_transformer_dir):
    model, tok, _ = load_checkpoint(tiny_transformer_dir)
    a = sample_names(model, tok, SampleSettings(n=20, seed=5)).names
    assert a == sample_names(model, tok, SampleSettings(n=20, seed=5)).names
    assert a != sample_names(model, tok, SampleSettings(n=20, seed=6)).names
    greedy = sample_names(model, tok, SampleSettings(n=5, seed=0, top_k=1)).names
    assert len(set(greedy)) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 0.0},
        {"temperature": float("nan")},
        {"prefix": "saint-X"},
        {"prefix": "a" * 60},
        {"n": 0},
        {"top_k": 0},
    ],
)
def test_sampling_rejects_bad_settings(tiny_transformer_dir, bad):
    model, tok, _ = load_checkpoint(tiny_transformer_dir)
    with pytest.raises(VillesError):
        sample_names(model, tok, SampleSettings(**{"n": 3, **bad}))
