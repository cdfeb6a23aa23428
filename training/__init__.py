"""villes.training: the commune-name corpus, its tokenizer and the ladder of generators up to a HookedTransformer."""

from training.errors import VillesError

__all__ = ["VillesError", "load_model", "load_sae"]


def __getattr__(name):  # lazy: importing torch-heavy modules only when asked keeps `villes --help` fast
    if name == "load_model":
        from training.transformer import load_model

        return load_model
    if name == "load_sae":
        from training.sae import load_sae

        return load_sae
    raise AttributeError(name)
