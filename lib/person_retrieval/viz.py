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
    """A figure of images (HxWx3 arrays, paths, or 3xHxW tensors as the generators return them) in a grid,
    with optional per-image titles."""
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * scale * 2.2), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            im = images[i]
            if hasattr(im, "permute") and im.ndim == 3 and im.shape[0] == 3:
                im = im.permute(1, 2, 0).cpu().numpy()
            ax.imshow(load_image(im) if isinstance(im, (str, Path)) else im, interpolation="nearest")
            if titles:
                ax.set_title(titles[i], fontsize=fontsize)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_history(history: list[dict], left: Sequence[str] = ("loss",), right: Sequence[str] = ("val_R1",), title: str = ""):
    """Training curves per epoch: ``left`` keys on the left axis, ``right`` keys (validation) on the right."""
    import matplotlib.pyplot as plt

    ep = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(figsize=(5, 3))
    for k in left:
        ax.plot(ep, [h[k] for h in history], "o-", label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel(", ".join(left))
    ax2 = ax.twinx()
    for k in right:
        ax2.plot(ep, [h[k] for h in history], "s--", color="tab:green", label=k)
    ax2.set_ylabel(", ".join(right) + " (%)")
    fig.legend(loc="upper center", ncol=len(left) + len(right), fontsize=8, bbox_to_anchor=(0.5, 1.02))
    if title:
        ax.set_title(title, fontsize=9, pad=18)
    fig.tight_layout()
    return fig


def bar_chart(values: dict, title: str = "", ylabel: str = "", sort: bool = True):
    """One bar per key (sorted by value when ``sort``), its value written above it."""
    import matplotlib.pyplot as plt

    items = sorted(values.items(), key=lambda kv: kv[1]) if sort else list(values.items())
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * len(items) + 1), 3))
    bars = ax.bar(range(len(items)), [v for _, v in items], color="tab:blue")
    ax.set_xticks(range(len(items)), [k for k, _ in items], rotation=60, ha="right", fontsize=7)
    ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def seed_strips(df, x: str, hue: str, y: str, seed: str, title: str = ""):
    """One dot per seed (labelled with it) for each ``x`` category, the ``hue`` groups side by side, and each
    group's mean as a short bar: how far the seeds fall apart, at a glance."""
    import matplotlib.pyplot as plt

    xs, hues = list(dict.fromkeys(df[x])), list(dict.fromkeys(df[hue]))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(xs) + 1), 3))
    width = 0.8 / max(1, len(hues))
    for j, h in enumerate(hues):
        color = f"C{j}"
        for i, c in enumerate(xs):
            part = df[(df[x] == c) & (df[hue] == h)]
            pos = i - 0.4 + width * (j + 0.5)
            ax.scatter([pos] * len(part), part[y], color=color, s=18, label=h if i == 0 else None, zorder=3)
            for _, r in part.iterrows():
                ax.annotate(str(r[seed]), (pos, r[y]), xytext=(4, 0), textcoords="offset points", fontsize=6, va="center")
            if len(part):
                m = part[y].mean()
                ax.plot([pos - width / 3, pos + width / 3], [m, m], color=color, lw=1.5)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_ylabel(y)
    ax.legend(fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def heatmaps(tables: dict, fmt: str = "{:.1f}", cmap: str = "viridis"):
    """Side-by-side annotated heatmaps of equally shaped DataFrames (e.g. train x test R1)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(3.6 * len(tables), 3.2), squeeze=False)
    for ax, (title, df) in zip(axes[0], tables.items()):
        v = df.to_numpy(dtype=float)
        ax.imshow(v, cmap=cmap, vmin=0, vmax=max(1.0, float(np.nanmax(v))))
        ax.set_xticks(range(df.shape[1]), [str(c).replace("_pedes", "") for c in df.columns], rotation=30)
        ax.set_yticks(range(df.shape[0]), [str(r).replace("_pedes", "") for r in df.index])
        ax.set_xlabel("test")
        ax.set_ylabel("train")
        ax.set_title(title, fontsize=9)
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                ax.text(j, i, fmt.format(v[i, j]), ha="center", va="center", color="w" if v[i, j] < np.nanmax(v) * 0.6 else "k", fontsize=8)
    fig.tight_layout()
    return fig


def captioned_images(images: Sequence, texts: Sequence[str], width: int = 70, title: str | None = None, scale: float = 1.0):
    """One row per image: the image, and beside it its text (wrapped), for captions and dialogues."""
    import textwrap

    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(8 * scale, 1.9 * n * scale), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 6]})
    for (a, b), im, t in zip(axes, images, texts):
        a.imshow(load_image(im) if isinstance(im, (str, Path)) else im, interpolation="nearest")
        a.axis("off")
        b.axis("off")
        wrapped = "\n".join(textwrap.fill(p, width) for p in t.split("\n"))
        b.text(0, 0.5, wrapped, va="center", ha="left", fontsize=7, family="monospace")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def ranking_rows(rows: Sequence[dict], k: int = 10, scale: float = 0.9, width: int = 120, first: str = "target"):
    """Top-``k`` rankings, one row each: ``{"label", "query", "true" (image), "ranked" (images),
    "correct" (bools)}``; the ``true`` image first (titled ``first``: the target, or a composed query's
    reference image), correct matches framed green, others red."""
    import textwrap

    import matplotlib.pyplot as plt

    n = len(rows)
    fig, axes = plt.subplots(n, k + 1, figsize=((k + 1) * scale, n * scale * 2.6), squeeze=False)
    for r, row in zip(axes, rows):
        for j, ax in enumerate(r):
            ax.set_xticks([])
            ax.set_yticks([])
            im = row["true"] if j == 0 else row["ranked"][j - 1]
            ax.imshow(load_image(im) if isinstance(im, (str, Path)) else im, interpolation="nearest")
            color = "black" if j == 0 else ("tab:green" if row["correct"][j - 1] else "tab:red")
            for s in ax.spines.values():
                s.set_edgecolor(color)
                s.set_linewidth(2.5 if j else 1)
        r[0].set_title(first, fontsize=7)
        r[1].set_title(textwrap.fill(f"{row['label']}: {row['query']}", width), fontsize=6.5, loc="left")
    fig.tight_layout()
    return fig
