"""villes.interp: open any HookedTransformer (and any SAELens SAE on it): activations, dashboards, monosemanticity,
steering and attribution of concepts to outputs. Submodules import lazily so that `import interp` stays light."""

__all__ = ["attribute"]


def __getattr__(name):
    if name == "attribute":
        from interp.attribution import attribute

        return attribute
    raise AttributeError(name)
