"""The paper's Figure 4 for one image: the picture, then the patches kept after each stage, the rest dimmed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def model_view(pixel_values: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """The image as the vision encoder saw it (resized, cropped), from its normalised pixel values: [H, W, 3]."""
    pixels = pixel_values.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy()


def dim_dropped(image: np.ndarray, kept: torch.Tensor, grid: int, dim: float = 0.2) -> np.ndarray:
    """The image with every patch not in `kept` (indices into a grid x grid raster) darkened."""
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    mask[kept.cpu().long()] = True
    height, width = image.shape[:2]
    cell = np.kron(mask.view(grid, grid).numpy(), np.ones((height // grid, width // grid), dtype=bool))
    out = image.copy()
    out[~cell] *= dim
    return out


def save_figure(image: np.ndarray, stages: list[tuple[str, torch.Tensor]], grid: int, path: Path, title: str = "") -> None:
    """Write the picture and one panel per stage (its title and kept patch indices) to `path`."""
    panels = [("image", image)] + [(name, dim_dropped(image, kept, grid)) for name, kept in stages]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for axis, (name, picture) in zip(np.atleast_1d(axes), panels):
        axis.imshow(picture)
        axis.set_title(name, fontsize=10)
        axis.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
