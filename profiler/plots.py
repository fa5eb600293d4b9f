"""Picture of a profile: per-head influence mass by query-key distance (local vs far-reaching heads)."""
from __future__ import annotations

from pathlib import Path

import torch

from moa_search.profiler.io import Profile


def mass_by_distance(influence: torch.Tensor) -> torch.Tensor:
    """[L, H, nb, nb] -> [L, H, nb]: share of each head's influence at block distance d = bq - bk."""
    L, H, nb, _ = influence.shape
    out = torch.stack([torch.diagonal(influence, offset=-d, dim1=-2, dim2=-1).sum(-1) for d in range(nb)], dim=-1)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-300)


def plot_distance_mass(profile: Profile, path) -> Path:
    """Heatmap, one row per (layer, head), one column per distance in blocks; log colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    mass = mass_by_distance(profile.influence.double())
    L, H, nb = mass.shape
    rows = mass.reshape(L * H, nb).numpy()
    positive = rows[rows > 0]
    vmin = max(float(positive.min()) if positive.size else 1e-6, 1e-6)
    fig, ax = plt.subplots(figsize=(8, max(3.0, min(24.0, 0.08 * L * H + 1.5))))
    im = ax.imshow(rows.clip(min=vmin), aspect="auto", interpolation="nearest", cmap="viridis",
                   norm=LogNorm(vmin=vmin, vmax=1.0), origin="upper")
    ax.set_xlabel(f"query-key distance (blocks of {profile.block_size} tokens)")
    ax.set_ylabel("layer x head (layer major)")
    if L > 1:
        ax.set_yticks([l * H for l in range(L)], [f"L{l}" for l in range(L)], fontsize=6)
    ax.set_title(f"influence share by distance, N={profile.length}, {profile.samples} samples\n"
                 "mass near 0 = local head; mass spread right = far-reaching head", fontsize=9)
    fig.colorbar(im, ax=ax, label="share of the head's influence")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
