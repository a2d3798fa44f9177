"""A picture of adversarial examples: originals, adversarial images and their amplified perturbations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["save_grid"]

CELL_INCHES = 1.5  # each image cell, so the PNG is (n·1.5·dpi) × (3·1.5·dpi) pixels
DPI = 100


def _image(t: Tensor):  # -> numpy array for imshow
    t = t.detach().float().cpu().clamp(0, 1)
    return t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy()


def save_grid(path: str | Path, x: Tensor, x_adv: Tensor, y: Tensor, pred_clean: Tensor, pred_adv: Tensor,
              classes: Sequence[str] | None = None, n: int = 8) -> Path:
    """Save a PNG of the first `n` examples as columns, in three rows.

    Rows: the original (title: label and clean prediction), the adversarial image (title: its
    prediction) and the perturbation δ = x_adv − x amplified as δ / (2·max|δ|) + 0.5 per image
    (grey is "unchanged"; the title gives ‖δ‖∞). A title is green when the prediction is the
    label and red when it is not. Uses matplotlib's Agg backend (no display needed).

    Args:
        path: the PNG file to write (its folder is created).
        x, x_adv: images (N, C, H, W) in [0, 1], C = 1 (grey) or 3 (RGB).
        y, pred_clean, pred_adv: labels and predictions (N,).
        classes: class names (index -> name); None prints the indices. (Default: None)
        n: how many examples (columns) at most. (Default: 8)

    Returns:
        the path written: k = min(n, N) columns, ``k·1.5`` by ``4.5`` inches at 100 dpi
        (150·k × 450 pixels).

    Example:
        >>> save_grid("grid.png", r.examples["x"], r.examples["x_adv"], r.examples["y"],
        ...           r.examples["clean_pred"], r.examples["adv_pred"], data.classes)
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # a no-op when a non-interactive backend is already set
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if x.dim() != 4 or x.shape != x_adv.shape:
        raise ValueError(f"`x` and `x_adv` must both have shape N×C×H×W, got {tuple(x.shape)} and {tuple(x_adv.shape)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"`x` must have 1 or 3 channels to be drawn, got {x.shape[1]}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive int, got {n!r}")
    k = min(n, x.shape[0])
    if k == 0:
        raise ValueError("nothing to draw: `x` is empty")
    y, pred_clean, pred_adv = (t.detach().cpu().long() for t in (y, pred_clean, pred_adv))

    def name(i: int) -> str:
        return str(classes[i]) if classes is not None and 0 <= i < len(classes) else str(i)

    # A Figure without pyplot: no global state, nothing left open after the call.
    fig = Figure(figsize=(CELL_INCHES * k, CELL_INCHES * 3), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, k, squeeze=False)
    grey = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    for j in range(k):
        for r in range(3):
            axes[r][j].set_axis_off()
        delta = (x_adv[j] - x[j]).detach().float().cpu()
        m = float(delta.abs().max())
        amplified = delta / (2 * m) + 0.5 if m > 0 else torch.full_like(delta, 0.5)
        ok_clean, ok_adv = int(pred_clean[j]) == int(y[j]), int(pred_adv[j]) == int(y[j])
        axes[0][j].imshow(_image(x[j]), **grey)
        axes[0][j].set_title(f"y={name(int(y[j]))} pred {name(int(pred_clean[j]))}", fontsize=8,
                             color="green" if ok_clean else "red")
        axes[1][j].imshow(_image(x_adv[j]), **grey)
        axes[1][j].set_title(f"adv pred {name(int(pred_adv[j]))}", fontsize=8, color="green" if ok_adv else "red")
        axes[2][j].imshow(_image(amplified), **grey)
        axes[2][j].set_title(f"δ ‖∞ {m:.3f}", fontsize=8)
    for r, text in enumerate(("original", "adversarial", "perturbation")):
        axes[r][0].text(-0.12, 0.5, text, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=8)
    fig.subplots_adjust(left=0.04, right=0.99, top=0.92, bottom=0.02, wspace=0.1, hspace=0.35)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path
