"""Bastion's own architectures, registered in `MODELS`.

Every builder has the signature ``builder(num_classes, in_shape, **kwargs) -> nn.Module`` and
returns a network that takes *normalized* inputs (`create_model` puts the `Normalize` layer in
front). All of them share one layout, so that detectors and feature-space defenses can find
the penultimate layer without knowing the architecture:

* ``net.features(x)`` -> ``(N, net.feature_dim)``: everything up to the penultimate layer;
* ``net.dropout``: dropout on the penultimate representation (a no-op when ``p == 0``);
* ``net.head``: the final ``nn.Linear(feature_dim, num_classes)``;
* ``net(x) == net.head(net.dropout(net.features(x)))``.

Registered names: ``mlp``, ``cnn-small``, ``madry-cnn``, ``preact-resnet18``, ``wide-resnet``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .base import MODELS

# Flattening a large feature map into a dense layer makes that layer huge (a 224×224 input
# would give cnn-small a 25M-weight fc). Maps larger than this are average-pooled down first;
# the published input sizes (28×28 MNIST, 32×32 CIFAR) are below the cap and stay untouched.
_MAX_FLAT_SIDE = 8

# ReLUs are never in place here: detectors and feature-space defenses hook intermediate layers,
# and an in-place ReLU would silently overwrite the output a forward hook captured (and breaks
# full backward hooks).


# --------------------------------------------------------------------------------------------
# Argument checks (builders can be called directly, not only through `create_model`).
# --------------------------------------------------------------------------------------------

def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
    return num_classes


def _check_in_shape(in_shape: Any, model: str, min_side: int, why: str) -> tuple[int, int, int]:
    """(C, H, W) of positive ints with H, W >= `min_side`; `why` explains the minimum."""
    try:
        shape = tuple(int(s) for s in in_shape)
    except (TypeError, ValueError):
        raise ValueError(f"`in_shape` must be (C, H, W) with positive sizes, got {in_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"`in_shape` must be (C, H, W) with positive sizes, got {in_shape!r}")
    c, h, w = shape
    if h < min_side or w < min_side:
        raise ValueError(f"`in_shape` {shape} is too small for model {model!r}: height and width must be "
                         f"at least {min_side} ({why}), got {h}×{w}")
    return c, h, w


def _check_dropout(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise ValueError(f"`dropout` must be a probability in [0, 1), got {p!r}")
    return float(p)


def _check_pos_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


def _init_weights(net: nn.Module) -> None:
    """He (kaiming) normal init for convolutions, unit/zero batch norm, zero linear biases."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _flatten_to_dense(channels: int, h: int, w: int) -> tuple[list[nn.Module], int]:
    """Layers that turn a C×h×w map into a vector, and the vector's length (capped, see above)."""
    layers: list[nn.Module] = []
    if h > _MAX_FLAT_SIDE or w > _MAX_FLAT_SIDE:
        h, w = min(h, _MAX_FLAT_SIDE), min(w, _MAX_FLAT_SIDE)
        layers.append(nn.AdaptiveAvgPool2d((h, w)))
    layers.append(nn.Flatten())
    return layers, channels * h * w


# --------------------------------------------------------------------------------------------
# The shared layout.
# --------------------------------------------------------------------------------------------

class ZooNet(nn.Module):
    """``head(dropout(features(x)))``: a feature extractor and a linear classifier on top.

    Args:
        features: maps a normalized N×C×H×W batch to N×`feature_dim` penultimate features.
        feature_dim: width of the penultimate layer.
        num_classes: number of logits.
        dropout: dropout probability on the penultimate features (kept as a module even at 0,
            so that the layout, and MC-dropout sampling, never depend on the value).
    """

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


# --------------------------------------------------------------------------------------------
# mlp
# --------------------------------------------------------------------------------------------

@MODELS.register("mlp", "multi-layer perceptron: flatten + ReLU hidden layers (hidden=(256, 256))")
def mlp(num_classes: int, in_shape: Sequence[int], *, hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0) -> ZooNet:
    """A fully connected ReLU network on the flattened image.

    A baseline, and the classic subject of early adversarial-example papers (Szegedy et al.
    2014, "Intriguing properties of neural networks"; Goodfellow et al. 2015, "Explaining and
    harnessing adversarial examples", arXiv:1412.6572).

    Args:
        num_classes: number of logits.
        in_shape: C×H×W of one input; any size (the input is flattened).
        hidden: widths of the hidden layers; ``()`` gives a linear (softmax regression) model.
        dropout: dropout probability after every hidden layer (on the input pixels when
            ``hidden=()``).
    """
    num_classes = _check_num_classes(num_classes)
    c, h, w = _check_in_shape(in_shape, "mlp", 1, "any positive size works")
    p = _check_dropout(dropout)
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise ValueError(f"`hidden` must be a sequence of positive layer widths, got {hidden!r}")
    widths = [_check_pos_int(n, "hidden") for n in hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    width = c * h * w
    for i, n in enumerate(widths):
        layers += [nn.Linear(width, n), nn.ReLU()]
        if i < len(widths) - 1:  # the last hidden layer's dropout is `ZooNet.dropout`
            layers.append(nn.Dropout(p))
        width = n
    net = ZooNet(nn.Sequential(*layers), width, num_classes, p)
    _init_weights(net)
    return net


# --------------------------------------------------------------------------------------------
# cnn-small
# --------------------------------------------------------------------------------------------

@MODELS.register("cnn-small", "small fast CNN: conv32-conv32-pool-conv64-pool-fc128 (tests, demos)")
def cnn_small(num_classes: int, in_shape: Sequence[int], *, dropout: float = 0.0) -> ZooNet:
    """A small convolutional network, quick to train on a CPU.

    conv3×3(32)-ReLU-conv3×3(32)-ReLU-maxpool2-[dropout]-conv3×3(64)-ReLU-maxpool2-fc(128)-ReLU
    -[dropout]-fc(classes), with 'same' padding. This is the shape of the MNIST network of
    Feinman et al. 2017 ("Detecting adversarial samples from artifacts", arXiv:1703.00410,
    whose kernel-density and Bayesian-uncertainty detectors use its penultimate layer and its
    dropout), slimmed to train in well under two minutes on two CPU cores.

    Args:
        num_classes: number of logits.
        in_shape: C×H×W; H and W at least 4 (two 2×2 max-pools). Maps larger than 8×8 after the
            pools (inputs above 35×35) are average-pooled to 8×8 before the dense layer.
        dropout: dropout probability after the first pooling block and on the 128-d penultimate
            features (0 disables it; MC-dropout detectors need it > 0).
    """
    num_classes = _check_num_classes(num_classes)
    c, h, w = _check_in_shape(in_shape, "cnn-small", 4, "two 2×2 max-pools")
    p = _check_dropout(dropout)
    flat, n_flat = _flatten_to_dense(64, h // 4, w // 4)
    features = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(p),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        *flat,
        nn.Linear(n_flat, 128), nn.ReLU(),
    )
    net = ZooNet(features, 128, num_classes, p)
    _init_weights(net)
    return net


# --------------------------------------------------------------------------------------------
# madry-cnn
# --------------------------------------------------------------------------------------------

@MODELS.register("madry-cnn", "MNIST-challenge CNN of Madry et al. 2018: conv5x5(32)-conv5x5(64)-fc1024")
def madry_cnn(num_classes: int, in_shape: Sequence[int]) -> ZooNet:
    """The network of the MNIST adversarial-examples challenge.

    Madry, Makelov, Schmidt, Tsipras and Vladu 2018, "Towards deep learning models resistant to
    adversarial attacks" (ICLR, arXiv:1706.06083), model of `MadryLab/mnist_challenge`:
    conv5×5(32, 'same')-ReLU-maxpool2, conv5×5(64, 'same')-ReLU-maxpool2, fc(1024)-ReLU,
    fc(classes). On 1×28×28 inputs with 10 classes it has 3,274,634 parameters, as the original.

    Args:
        num_classes: number of logits.
        in_shape: C×H×W; H and W at least 4 (two 2×2 max-pools). Maps larger than 8×8 after the
            pools (inputs above 35×35) are average-pooled to 8×8 before the dense layer, which
            the original (28×28 only) never needed.
    """
    num_classes = _check_num_classes(num_classes)
    c, h, w = _check_in_shape(in_shape, "madry-cnn", 4, "two 2×2 max-pools")
    flat, n_flat = _flatten_to_dense(64, h // 4, w // 4)
    features = nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        *flat,
        nn.Linear(n_flat, 1024), nn.ReLU(),
    )
    net = ZooNet(features, 1024, num_classes)
    _init_weights(net)
    return net


# --------------------------------------------------------------------------------------------
# Pre-activation residual blocks (shared by preact-resnet18 and wide-resnet).
# --------------------------------------------------------------------------------------------

class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-[dropout]-conv3×3 plus a shortcut (He et al. 2016, "Identity
    mappings in deep residual networks", arXiv:1603.05027).

    When the shape changes the shortcut is a 1×1 convolution applied to the *pre-activated*
    input, as in the reference implementations of Fast AT and Wide ResNets.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # Not in place: `x` is the identity shortcut and must survive unchanged.
        out = nn.functional.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(nn.functional.relu(self.bn2(out))))
        return out + skip


def _stage(in_ch: int, out_ch: int, blocks: int, stride: int, dropout: float = 0.0) -> nn.Sequential:
    layers = [PreActBlock(in_ch, out_ch, stride, dropout)]
    layers += [PreActBlock(out_ch, out_ch, 1, dropout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _resnet_trunk(stem: nn.Module, stages: list[nn.Module], channels: int) -> nn.Sequential:
    """stem -> stages -> final BN-ReLU (pre-activation nets end un-normalized) -> pool -> flatten."""
    return nn.Sequential(stem, *stages, nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


# --------------------------------------------------------------------------------------------
# preact-resnet18
# --------------------------------------------------------------------------------------------

@MODELS.register("preact-resnet18", "PreAct ResNet-18 (He et al. 2016), CIFAR stem, as in Fast AT (width=64)")
def preact_resnet18(num_classes: int, in_shape: Sequence[int], *, width: int = 64) -> ZooNet:
    """Pre-activation ResNet-18 with a CIFAR-style 3×3 stem.

    He, Zhang, Ren and Sun 2016, "Identity mappings in deep residual networks" (ECCV,
    arXiv:1603.05027), in the variant used by Wong, Rice and Kolter 2020, "Fast is better than
    free: revisiting adversarial training" (ICLR, arXiv:2001.03994) and by Rice et al. 2020:
    conv3×3(w), four stages of two blocks with widths w, 2w, 4w, 8w and strides 1, 2, 2, 2, a
    final BN-ReLU, global average pooling and a linear layer. With ``width=64`` and 10 classes
    it has 11,172,170 parameters.

    Args:
        num_classes: number of logits.
        in_shape: C×H×W; H and W at least 8 (three stride-2 stages; smaller inputs would be
            reduced to a single pixel before the last stage).
        width: channels of the first stage (64 in the paper; smaller for fast tests).
    """
    num_classes = _check_num_classes(num_classes)
    c, _, _ = _check_in_shape(in_shape, "preact-resnet18", 8, "three stride-2 stages take 8×8 down to 1×1")
    w = _check_pos_int(width, "width")
    stem = nn.Conv2d(c, w, 3, stride=1, padding=1, bias=False)
    stages = [_stage(w, w, 2, 1), _stage(w, 2 * w, 2, 2), _stage(2 * w, 4 * w, 2, 2), _stage(4 * w, 8 * w, 2, 2)]
    net = ZooNet(_resnet_trunk(stem, stages, 8 * w), 8 * w, num_classes)
    _init_weights(net)
    return net


# --------------------------------------------------------------------------------------------
# wide-resnet
# --------------------------------------------------------------------------------------------

@MODELS.register("wide-resnet", "Wide ResNet WRN-depth-widen (Zagoruyko & Komodakis 2016), default WRN-28-10")
def wide_resnet(num_classes: int, in_shape: Sequence[int], *, depth: int = 28, widen: int = 10,
                dropout: float = 0.0) -> ZooNet:
    """Wide residual network WRN-`depth`-`widen`.

    Zagoruyko and Komodakis 2016, "Wide residual networks" (BMVC, arXiv:1605.07146): a 3×3 stem
    with 16 channels, three stages of ``(depth - 4) / 6`` pre-activation blocks with widths
    16·k, 32·k, 64·k (k = `widen`) and strides 1, 2, 2, dropout between the two convolutions of
    each block, a final BN-ReLU, global average pooling and a linear layer. WRN-28-10 (the
    default; Madry et al. 2018, TRADES, AutoAttack's leaderboard) has 36,479,194 parameters
    for 10 classes; WRN-34-10 is ``depth=34``.

    Args:
        num_classes: number of logits.
        in_shape: C×H×W; H and W at least 4 (two stride-2 stages).
        depth: total depth; ``(depth - 4) % 6 == 0`` and ``depth >= 10``.
        widen: width multiplier k.
        dropout: dropout probability inside each block (0.3 in the paper's dropout runs).
    """
    num_classes = _check_num_classes(num_classes)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"`depth` must be an integer >= 10 with (depth - 4) % 6 == 0 "
                         f"(10, 16, 22, 28, 34, 40, ...), got {depth!r}")
    k = _check_pos_int(widen, "widen")
    p = _check_dropout(dropout)
    c, _, _ = _check_in_shape(in_shape, "wide-resnet", 4, "two stride-2 stages take 4×4 down to 1×1")
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    stem = nn.Conv2d(c, widths[0], 3, stride=1, padding=1, bias=False)
    stages = [_stage(widths[0], widths[1], n, 1, p), _stage(widths[1], widths[2], n, 2, p),
              _stage(widths[2], widths[3], n, 2, p)]
    net = ZooNet(_resnet_trunk(stem, stages, widths[3]), widths[3], num_classes)
    _init_weights(net)
    return net


# --------------------------------------------------------------------------------------------
# ensemble (of trained models, saved as one)
# --------------------------------------------------------------------------------------------

@MODELS.register("ensemble", "trained models combined into one (`bastion ensemble RUN RUN ...`): "
                             "members=[model specs], mode=logits|probs|vote")
def ensemble(num_classes: int, in_shape: Sequence[int], *, members: Sequence[Any], mode: str = "logits") -> nn.Module:
    """The `bastion.defenses.layers.Ensemble` of the models the member specs describe.

    This is how an ensemble is saved: its spec lists each member's spec (name, options,
    normalization, layers), so `load_model` rebuilds every member and loads all weights at once,
    and every command (evaluate, audit, transfer) attacks the ensemble as one model. Build one
    from trained models with `bastion.defenses.layers.ensemble_model` or ``bastion ensemble``.

    Args:
        num_classes, in_shape: those of every member.
        members: member specs (`ModelSpec` or its dict), in order.
        mode: ``"logits"``, ``"probs"`` or ``"vote"`` (see `Ensemble`).
    """
    from ..defenses.layers import Ensemble  # defenses import models; only this builder needs them
    from .base import ModelSpec, model_from_spec

    num_classes = _check_num_classes(num_classes)
    if isinstance(members, (str, bytes)) or not isinstance(members, Sequence) or not members:
        raise ValueError(f"`members` must be a non-empty list of model specs, got {members!r}")
    nets = []
    for i, m in enumerate(members):
        spec = m if isinstance(m, ModelSpec) else ModelSpec.from_dict(m)
        if spec.num_classes != num_classes or tuple(spec.in_shape) != tuple(in_shape):
            raise ValueError(f"`members[{i}]` ({spec.name}) takes {tuple(spec.in_shape)} images with "
                             f"{spec.num_classes} classes; the ensemble takes {tuple(in_shape)} with {num_classes}")
        nets.append(model_from_spec(spec))
    return Ensemble(nets, mode)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters (used in the docs to check architectures against papers)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


__all__ = ["PreActBlock", "ZooNet", "cnn_small", "count_parameters", "ensemble", "madry_cnn", "mlp",
           "preact_resnet18", "wide_resnet"]
