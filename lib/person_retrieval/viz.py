"""Small plotting helpers shared by the notebooks."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def load_image(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def image_grid(images: Sequence, titles: Sequence[str] | None = None, cols: int = 8, scale: float = 1.1,
               title: str | None = None, fontsize: int = 7):
    """A figure of images (arrays or paths) in a grid, with optional per-image titles."""
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * scale * 2.2), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            im = images[i]
            ax.imshow(load_image(im) if isinstance(im, (str, Path)) else im, interpolation="nearest")
            if titles:
                ax.set_title(titles[i], fontsize=fontsize)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
