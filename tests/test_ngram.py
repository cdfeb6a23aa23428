import math

import numpy as np
import pytest

from training.ngram import NGramModel, NGramSettings
from training.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def train_names(corpus):
    return corpus.split_names("train")[:3000]


@pytest.mark.parametrize("smoothing", ["kneser-ney", "absolute"])
@pytest.mark.parametrize("order", [0, 1, 2, 3, 5, 7])
def test_distributions_sum_to_one_and_match_prob(train_names, smoothing, order):
    tok = CharTokenizer.from_names(train_names)
    model = NGramModel(tok, NGramSettings(order=order, smoothing=smoothing)).fit(train_names)
    for prefix in ["", "s", "saint-", "qzx", "ville", "les-"]:
        history = tok.encode_prefix(prefix) if set(prefix) <= set(tok.chars) else tok.encode_prefix("")
        p = model.distribution(history)
        assert p.min() > 0
        assert abs(p.sum() - 1.0) < 1e-9
        padded = (1,) * order + tuple(history)
        h = padded[len(padded) - max(order - 1, 0) :] if order > 1 else ()
        assert all(abs(model.prob(h, int(w)) - p[i]) < 1e-12 for i, w in enumerate(model.outputs))


def test_nll_by_hand_on_a_tiny_corpus():
    tok = CharTokenizer("ab")
    # order 0: uniform over {a, b, <eos>}
    assert NGramModel(tok, NGramSettings(order=0)).fit(["ab"]).nll(["ab"]) == pytest.approx((3 * math.log(3), 3))
    # order 1, absolute discounting D = 0.5 on counts a:2 b:1 <eos>:2 (N = 5, 3 types), interpolated with 1/3:
    # p(a) = (1.5 + 0.5*3/3)/5 = 0.4, p(b) = (0.5 + 0.5)/5 = 0.2, p(<eos>) = 0.4
    m = NGramModel(tok, NGramSettings(order=1, smoothing="absolute", discount=0.5)).fit(["ab", "a"])
    total, n = m.nll(["ab"])
    assert n == 3
    assert total == pytest.approx(-math.log(0.4) - math.log(0.2) - math.log(0.4))
    # order 2 on the same corpus: after <bos> we saw a twice -> c(<bos>)=2, one type
    m2 = NGramModel(tok, NGramSettings(order=2, smoothing="absolute", discount=0.5)).fit(["ab", "a"])
    p_a_after_bos = (2 - 0.5 + 0.5 * 1 * 0.4) / 2
    assert m2.prob((1,), tok.stoi["a"]) == pytest.approx(p_a_after_bos)


def test_longer_context_helps_held_out(corpus):
    tok = CharTokenizer.from_names(corpus.names)
    train, val = corpus.split_names("train")[:8000], corpus.split_names("val")[:1000]
    scores = []
    for order in (0, 1, 2, 3, 5):
        total, n = NGramModel(tok, NGramSettings(order=order)).fit(train).nll(val)
        scores.append(total / n)
    assert scores == sorted(scores, reverse=True)
    assert all(np.isfinite(scores))


def test_sampling_is_seeded(train_names):
    tok = CharTokenizer.from_names(train_names)
    m = NGramModel(tok, NGramSettings(order=4)).fit(train_names)
    assert m.sample(5, seed=3) == m.sample(5, seed=3) != m.sample(5, seed=4)
    assert all(s.startswith("saint-") for s in m.sample(5, seed=0, prefix="saint-"))


def test_ladder_train_sample_changes_only_the_train_column(tiny_corpus):
    from training.ladder import ladder

    kw = {"checkpoints": {}, "n_novelty": 20, "progress": False}
    full, _ = ladder(tiny_corpus, **kw)
    n = len(tiny_corpus.split_names("train")) // 3
    sampled, notes = ladder(tiny_corpus, train_sample=n, **kw)
    assert any(f"{n:,} train names" in note for note in notes)
    assert [r.val_nll for r in sampled] == [r.val_nll for r in full]
    assert [r.samples for r in sampled] == [r.samples for r in full]
    assert sampled[-1].train_nll != full[-1].train_nll
    assert sampled == ladder(tiny_corpus, train_sample=n, **kw)[0]  # the sample is seeded
