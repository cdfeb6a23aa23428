import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.errors import VillesError
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, CharTokenizer


@pytest.fixture(scope="module")
def tok(corpus):
    return CharTokenizer.from_names(corpus.names)


def test_every_corpus_name_round_trips(tok, corpus):
    for name in corpus.names:
        ids = tok.encode(name)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) == len(name) + 2
        assert tok.decode(ids) == name


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_string_of_vocabulary_characters_round_trips(tok, data):
    name = data.draw(st.text(alphabet=st.sampled_from(tok.chars), max_size=40))
    assert tok.decode(tok.encode(name)) == name
    assert tok.to_hf().decode(tok.encode(name)[1:-1]) == name


def test_unknown_character_names_char_and_name(tok):
    with pytest.raises(VillesError, match=r"'X' in 'saint-X'"):
        tok.encode("saint-X")
    assert tok.decode(tok.encode("saint-X", drop_unknown=True)) == "saint-"


def test_batch_is_right_padded(tok):
    batch = tok.batch(["ay", "saint-malo"])
    assert batch.shape == (2, 12)
    assert (batch[0, 4:] == PAD_ID).all() and batch[0, 3] == EOS_ID


def test_folder_round_trip_and_transformer_lens(tmp_path, tok):
    from training.transformer import TransformerSettings, build_model

    tok.save(tmp_path / "tokenizer")
    assert CharTokenizer.load(tmp_path / "tokenizer") == tok
    model = build_model(
        TransformerSettings(n_layers=1, d_model=8, n_heads=2).hooked_config(tok.vocab_size), tmp_path / "tokenizer"
    )
    assert model.to_str_tokens("saint-malo") == ["<bos>", *"saint-malo"]
    assert model.to_tokens("l'ay").tolist() == [tok.encode("l'ay")[:-1]]
    with pytest.raises(VillesError, match="no tokenizer"):
        CharTokenizer.load(tmp_path / "nowhere")
