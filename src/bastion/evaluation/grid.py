"""A picture of adversarial examples: originals, adversarial images, amplified perturbations, and CAMs."""

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
              classes: Sequence[str] | None = None, n: int = 8,
              cams: tuple[Tensor, Tensor] | None = None) -> Path:
    """Save a PNG of the first `n` examples as columns, in three rows (five with `cams`).

    Rows: the original (title: label and clean prediction), the adversarial image (title: its
    prediction) and the perturbation δ = x_adv − x amplified as δ / (2·max|δ|) + 0.5 per image
    (grey is "unchanged"; the title gives ‖δ‖∞). A title is green when the prediction is the
    label and red when it is not. With `cams`, two more rows show the class-activation maps
    (`bastion.evaluation.cam.grad_cam`) as a heat map over the grey image: the clean input's map
    for the clean prediction and the adversarial input's map for the adversarial prediction, so
    that a reader sees where the model's attention moved. Uses matplotlib's Agg backend (no
    display needed).

    Args:
        path: the PNG file to write (its folder is created).
        x, x_adv: images (N, C, H, W) in [0, 1], C = 1 (grey) or 3 (RGB).
        y, pred_clean, pred_adv: labels and predictions (N,).
        classes: class names (index -> name); None prints the indices. (Default: None)
        n: how many examples (columns) at most. (Default: 8)
        cams: (clean maps, adversarial maps), each (N, H, W) in [0, 1], e.g.
            ``(grad_cam(model, x, pred_clean), grad_cam(model, x_adv, pred_adv))``; None: no
            CAM rows. (Default: None)

    Returns:
        the path written: k = min(n, N) columns, ``k·1.5`` by ``1.5·rows`` inches at 100 dpi
        (150·k × 450 pixels, 150·k × 750 with `cams`).

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
    if cams is not None:
        want = (x.shape[0], *x.shape[-2:])
        if not isinstance(cams, (tuple, list)) or len(cams) != 2 or any(
                not isinstance(c, Tensor) or tuple(c.shape) != want for c in cams):
            got = [tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__ for c in cams] \
                if isinstance(cams, (tuple, list)) else type(cams).__name__
            raise ValueError(f"`cams` must be (clean maps, adversarial maps), each of shape {want}, got {got}")
        cams = (cams[0].detach().float().cpu().clamp(0, 1), cams[1].detach().float().cpu().clamp(0, 1))
    rows = 3 if cams is None else 5

    def name(i: int) -> str:
        return str(classes[i]) if classes is not None and 0 <= i < len(classes) else str(i)

    # A Figure without pyplot: no global state, nothing left open after the call.
    fig = Figure(figsize=(CELL_INCHES * k, CELL_INCHES * rows), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, k, squeeze=False)
    grey = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    for j in range(k):
        for r in range(rows):
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
        if cams is not None:
            for r, img, cam, pred in ((3, x[j], cams[0][j], pred_clean[j]), (4, x_adv[j], cams[1][j], pred_adv[j])):
                axes[r][j].imshow(_image(img.mean(0, keepdim=True)), **grey)  # the heat map over the grey image
                axes[r][j].imshow(cam.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
                axes[r][j].set_title(f"CAM of {name(int(pred))}", fontsize=8)
    labels = ("original", "adversarial", "perturbation", "CAM clean", "CAM adv.")[:rows]
    for r, text in enumerate(labels):
        axes[r][0].text(-0.12, 0.5, text, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=8)
    fig.subplots_adjust(left=0.04, right=0.99, top=1 - 0.24 / rows, bottom=0.06 / rows, wspace=0.1, hspace=0.35)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path
