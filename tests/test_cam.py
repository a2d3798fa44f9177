"""`bastion.evaluation.cam.grad_cam` (Grad-CAM, Selvaraju et al. 2017) and the grid's CAM rows.

The localization test uses a hand-built convolutional model whose class-1 logit reads only the
top-left quadrant of the image and whose class-0 logit reads only the bottom-right one: Grad-CAM
must put the mass of each class's map in that class's quadrant.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.evaluation.cam import cam_method, default_layer, grad_cam
from bastion.evaluation.grid import save_grid

from conftest import TinyCNN


class QuadrantNet(nn.Module):
    """Class 1 reads only the top-left quadrant of the image, class 0 only the bottom-right one.

    conv (identity kernel) → ReLU → `quadrants`: four feature maps, map q is the activation
    masked to quadrant q (0 = top-left, 3 = bottom-right) → logits: class 1 = Σ map 0,
    class 0 = Σ map 3, class 2 = 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 1, 1] = 1.0
        self.relu = nn.ReLU(inplace=True)  # in place right after a hooked conv: must not break the hook
        self.quadrants = Quadrants()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quadrants(self.relu(self.conv(x)))
        tl, br = q[:, 0].sum((1, 2)), q[:, 3].sum((1, 2))
        return torch.stack([br, tl, torch.zeros_like(tl)], 1)


class Quadrants(nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        h, w = a.shape[-2:]
        masks = torch.zeros(4, h, w, device=a.device)
        masks[0, : h // 2, : w // 2] = 1
        masks[1, : h // 2, w // 2:] = 1
        masks[2, h // 2:, : w // 2] = 1
        masks[3, h // 2:, w // 2:] = 1
        return a * masks  # (N, 1, h, w) * (4, h, w) -> (N, 4, h, w)


class BrightNet(nn.Module):
    """Class 1's logit is the total brightness (through one conv channel), class 0's is constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 1, 1] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.conv(x)).sum((1, 2, 3))
        return torch.stack([torch.full_like(s, 5.0), s], 1)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _quadrant_mass(cams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = cams.shape[-2:]
    total = cams.sum((1, 2))
    return cams[:, : h // 2, : w // 2].sum((1, 2)) / total, cams[:, h // 2:, w // 2:].sum((1, 2)) / total


def test_cam_concentrates_where_the_class_evidence_is():
    torch.manual_seed(0)
    model = QuadrantNet().eval()
    x = torch.rand(6, 1, 16, 16)
    top_left, bottom_right = _quadrant_mass(grad_cam(model, x, 1, layer=model.quadrants))
    assert bool((top_left > 0.99).all()), top_left
    top_left, bottom_right = _quadrant_mass(grad_cam(model, x, torch.zeros(6, dtype=torch.long), layer="quadrants"))
    assert bool((bottom_right > 0.99).all()), bottom_right
    # a class that no pixel supports has an all-zero map
    assert float(grad_cam(model, x, 2, layer=model.quadrants).abs().max()) == 0.0


def test_cam_of_the_default_layer_follows_the_image_content():
    """A bright quadrant (in a different place per image) on a dim background: class 1 (brightness)
    must light up that quadrant, with the default layer (the last Conv2d)."""
    torch.manual_seed(0)
    x = 0.1 * torch.rand(4, 1, 16, 16)
    for q in range(4):
        r, c = divmod(q, 2)
        x[q, 0, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1.0
    cams = grad_cam(BrightNet(), x, 1)
    mass = torch.stack([cams[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8].sum((1, 2)) for r in (0, 1) for c in (0, 1)], 1)
    mass = mass / cams.sum((1, 2), keepdim=False)[:, None]
    assert mass.argmax(1).tolist() == [0, 1, 2, 3]
    assert bool((mass.diagonal() > 0.8).all()), mass


@pytest.fixture(scope="module")
def cnn():
    """An untrained TinyCNN in eval mode: Grad-CAM's contract does not need a trained model."""
    torch.manual_seed(0)
    return TinyCNN().eval()


def test_shapes_range_batches_and_device(digits, cnn):
    x = digits["x_test"][:10]
    c = cnn(x).argmax(1)
    cams = grad_cam(cnn, x, c)
    assert cams.shape == (10, 8, 8) and cams.device == x.device and cams.dtype == torch.float32
    assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
    # each map is scaled to a maximum of 1, or all zero where the class has no positive evidence
    top = cams.flatten(1).amax(1)
    assert bool(((top - 1).abs() < 1e-6).logical_or(top == 0).all()) and bool((top > 0).any())
    # batching does not change a map
    assert torch.allclose(grad_cam(cnn, x, c, batch_size=3), cams, atol=1e-6)
    assert grad_cam(cnn, x[:0], c[:0]).shape == (0, 8, 8)


def test_hooks_removed_no_parameter_grad_and_mode_restored(digits):
    model = TinyCNN()
    model.train()
    layer = default_layer(model)
    assert isinstance(layer, nn.Conv2d)
    x = digits["x_test"][:4]
    grad_cam(model, x, 3)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())

    # also when the forward raises
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    broken = nn.Sequential(nn.Conv2d(1, 2, 3), Boom())
    with pytest.raises(RuntimeError, match="boom"):
        grad_cam(broken, x, 0)
    assert not broken[0]._forward_hooks and broken.training


def test_layer_by_name_and_errors(digits, cnn):
    x = digits["x_test"][:3]
    name = next(k for k, m in cnn.named_modules() if m is default_layer(cnn))
    assert torch.equal(grad_cam(cnn, x, 1, layer=name), grad_cam(cnn, x, 1))
    with pytest.raises(ValueError, match="`layer`"):
        grad_cam(cnn, x, 1, layer="no.such.layer")
    with pytest.raises(ValueError, match="`layer`"):
        grad_cam(cnn, x, 1, layer=nn.Conv2d(1, 1, 1))  # not part of the model
    with pytest.raises(ValueError, match="`layer`"):  # outputs no feature maps
        grad_cam(cnn, x, 1, layer=list(cnn.modules())[-1])
    with pytest.raises(ValueError, match="`classes`"):
        grad_cam(cnn, x, 10)
    with pytest.raises(ValueError, match="`classes`"):
        grad_cam(cnn, x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="`x`"):
        grad_cam(cnn, x[0], 1)


def test_conv_free_model_falls_back_to_gradient_times_input(digits):
    torch.manual_seed(0)
    model = MLP()
    assert default_layer(model) is None and cam_method(model) == "gradient-x-input"
    x = digits["x_test"][:5]
    cams = grad_cam(model, x, 2)
    assert cams.shape == (5, 8, 8) and float(cams.max()) == pytest.approx(1.0)
    # gradient × input: a black pixel carries no evidence
    assert float(cams[x[:, 0] == 0].abs().max()) == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_grid_with_cams_has_two_more_rows(tmp_path, digits, cnn):
    from PIL import Image

    x = digits["x_test"][:4]
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    y = digits["y_test"][:4]
    p, pa = cnn(x).argmax(1), cnn(x_adv).argmax(1)
    plain = save_grid(tmp_path / "a.png", x, x_adv, y, p, pa)
    cams = (grad_cam(cnn, x, p), grad_cam(cnn, x_adv, pa))
    with_cams = save_grid(tmp_path / "b.png", x, x_adv, y, p, pa, cams=cams)
    w0, h0 = Image.open(plain).size
    w1, h1 = Image.open(with_cams).size
    assert (w0, h0) == (600, 450) and (w1, h1) == (600, 750)
    with pytest.raises(ValueError, match="`cams`"):
        save_grid(tmp_path / "c.png", x, x_adv, y, p, pa, cams=(cams[0][:2], cams[1]))
