"""Toy SAEs (the reference's simple_sae and simple_sae_topk), with SAELens: low-dimensional data made of a few known
sparse directions, an L1 and a TopK SAE trained on it, and how well their decoder directions find the planted ones.

Each sample is a sum of `n_features` fixed unit directions, each present independently with probability
`p_active` at a magnitude uniform in [0, 1]: more directions than dimensions (superposition) is the point, and
sparsity is what lets an SAE take them apart. A planted direction counts as found by the best cosine between it and
the decoder direction of a latent that fires on the data (a dead latent's decoder is still its random
initialization, and in two dimensions a random direction often lands near a planted one by chance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from jaxtyping import Float
from torch import Tensor

from training.errors import VillesError
from training.sae import SAESettings, to_inference, train_sae


@dataclass(frozen=True)
class ToySettings:
    d: int = 2  # dimensions of the data
    n_features: int = 3  # planted directions (more than d: superposition)
    p_active: float = 0.08  # probability that a direction is present in a sample
    n_samples: int = 20_000
    noise: float = 0.0  # std of isotropic Gaussian noise added to every sample
    d_sae: int = 6
    k: int = 1  # TopK SAE
    l1: float = 2.0  # L1 SAE (on inputs normalized to mean norm sqrt(d), as every SAE here)
    tokens: int = 200_000  # samples drawn while training each SAE
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0

    def validate(self) -> None:
        if self.d < 1 or self.n_features < 1 or self.n_samples < self.batch_size:
            raise VillesError("toy data needs d >= 1, n_features >= 1 and at least one batch of samples")
        if not 0 < self.p_active <= 1:
            raise VillesError(f"p_active must be in (0, 1], got {self.p_active}")


def planted_directions(s: ToySettings) -> Float[Tensor, "n_features d"]:
    """Unit directions: evenly spread around the circle in 2-D (randomly turned), random in higher dimensions."""
    gen = torch.Generator().manual_seed(s.seed)
    if s.d == 2:
        angles = torch.rand(1, generator=gen) * 2 * math.pi + torch.arange(s.n_features) * 2 * math.pi / s.n_features
        return torch.stack([angles.cos(), angles.sin()], dim=-1)
    directions = torch.randn(s.n_features, s.d, generator=gen)
    return directions / directions.norm(dim=-1, keepdim=True)


def make_toy_data(s: ToySettings) -> tuple[Float[Tensor, "n_samples d"], Float[Tensor, "n_features d"]]:
    """(samples, planted unit directions), seeded."""
    s.validate()
    directions = planted_directions(s)
    gen = torch.Generator().manual_seed(s.seed + 1)
    present = torch.rand(s.n_samples, s.n_features, generator=gen) < s.p_active
    magnitudes = torch.rand(s.n_samples, s.n_features, generator=gen) * present
    data = magnitudes @ directions
    if s.noise:
        data = data + s.noise * torch.randn(data.shape, generator=gen)
    return data, directions


def alive_decoder_directions(sae, data: Float[Tensor, "n d"]) -> Float[Tensor, "alive d"]:
    """Unit decoder directions of the latents that fire on `data`."""
    with torch.no_grad():
        alive = (sae.encode(data) != 0).any(0)
        w = sae.W_dec[alive]
        return w / w.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def match_cosines(learned: Float[Tensor, "m d"], planted: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:  # noqa: F722
    """Per planted direction, the best cosine with a learned direction (0 when nothing was learned)."""
    if len(learned) == 0:
        return torch.zeros(len(planted))
    return (planted @ learned.T).max(dim=1).values


def train_toy_saes(s: ToySettings = ToySettings()) -> dict:
    """Train an L1 ("standard") and a TopK SAE on the toy data with SAELens; return data, directions and scores."""
    data, planted = make_toy_data(s)
    # b_dec stays at zero: here "no feature present" is the zero vector, not the mean sample
    base = SAESettings(
        d_sae=s.d_sae, tokens=s.tokens, batch_size=s.batch_size, lr=s.lr, b_dec_init="zeros", seed=s.seed
    )
    result = {"data": data, "planted": planted, "settings": s, "saes": {}}
    for name, settings in (
        ("L1", replace(base, arch="standard", l1=s.l1)),
        (f"TopK (k={s.k})", replace(base, arch="topk", k=s.k)),
    ):
        training_sae, _ = train_sae(data, settings, progress=False)
        sae = to_inference(training_sae)
        learned = alive_decoder_directions(sae, data)
        cosines = match_cosines(learned, planted)
        with torch.no_grad():
            recon = sae.decode(sae.encode(data))
        result["saes"][name] = {
            "sae": sae,
            "learned": learned,
            "cosines": cosines.tolist(),
            "alive": len(learned),
            "l0": (sae.encode(data) != 0).float().sum(-1).mean().item(),
            "explained_variance": 1 - ((recon - data).pow(2).sum() / (data - data.mean(0)).pow(2).sum()).item(),
        }
    return result


def toy_figure(result: dict):
    """Plotly: one panel per SAE, the samples (projected on their top two principal axes when d > 2), the planted
    directions (solid) and the learned decoder directions of live latents (dashed)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    data, planted = result["data"], result["planted"]
    if data.shape[1] == 2:
        basis = torch.eye(2)
    else:
        basis = torch.linalg.svd(data - data.mean(0), full_matrices=False).Vh[:2].T
    points = (data[:2000] @ basis).numpy()
    scale = float(data.norm(dim=-1).max())
    names = list(result["saes"])
    titles = [f"{n}: cos {', '.join(f'{c:.3f}' for c in result['saes'][n]['cosines'])}" for n in names]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=titles)
    for col, name in enumerate(names, start=1):
        fig.add_trace(
            go.Scatter(
                x=points[:, 0],
                y=points[:, 1],
                mode="markers",
                marker={"size": 3, "opacity": 0.3, "color": "grey"},
                name="samples",
                showlegend=col == 1,
            ),
            row=1,
            col=col,
        )
        for label, directions, style in (
            ("planted", planted, {"color": "black", "width": 3}),
            ("learned", result["saes"][name]["learned"], {"color": "crimson", "width": 2, "dash": "dash"}),
        ):
            ends = (directions @ basis).numpy() * scale
            for i, (x, y) in enumerate(ends):
                fig.add_trace(
                    go.Scatter(
                        x=[0, x],
                        y=[0, y],
                        mode="lines",
                        line=style,
                        name=label,
                        legendgroup=label,
                        showlegend=col == 1 and i == 0,
                    ),
                    row=1,
                    col=col,
                )
        fig.update_xaxes(scaleanchor=f"y{col if col > 1 else ''}", row=1, col=col)
    fig.update_layout(title="Toy SAEs: planted vs learned directions", height=460, width=460 * len(names))
    return fig
