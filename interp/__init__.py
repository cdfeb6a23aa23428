"""villes.interp: open any HookedTransformer (and any SAELens SAE on it): activations, dashboards, monosemanticity,
steering and attribution of concepts to outputs. Submodules import lazily so that `import interp` stays light."""

__all__ = ["attribute", "dashboards"]


def __getattr__(name):
    if name == "attribute":
        from interp.attribution import attribute

        return attribute
    if name == "dashboards":  # a callable module: interp.dashboards(model, sae=None, hook=...) builds the pages
        import interp.dashboards

        return interp.dashboards
    raise AttributeError(name)
