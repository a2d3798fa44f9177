"""The transform contract's shared pieces: `zero_grad_output` and per-instance ``randomized``.

A transform whose randomness an option switches off must say so on that instance (the class
attribute stays the default), so that `Defended.randomized` — what the evaluator reads to
decide on EOT — is right for the pipeline actually built.
"""

from __future__ import annotations

import pytest
import torch

from bastion.defenses.pipeline import Defended
from bastion.defenses.transforms import RandomizedTransform, create_transform, zero_grad_output
from bastion.defenses.transforms import base, noise
from bastion.defenses.transforms.quilting import Quilting


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_zero_grad_output_gives_the_real_values_and_a_zero_gradient():
    x = _images().requires_grad_(True)
    real = (x.detach() * 4).round() / 4
    out = zero_grad_output(real, x)
    assert torch.equal(out, real)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == x.shape and bool((g == 0).all())
    # without autograd on the input nothing is attached
    assert not zero_grad_output(real, x.detach()).requires_grad
    # one helper for the whole package (noise re-exports it for older imports)
    assert noise.zero_grad_output is base.zero_grad_output and noise.RandomizedTransform is RandomizedTransform


def _quilting(k: int) -> Quilting:
    return Quilting(patch_size=3, overlap=1, k=k, seed=0).fit(_images(8, seed=1), num_patches=500)


# (builder with the randomness switched off, builder with it on)
CASES = {
    "quilting": (lambda: _quilting(1), lambda: _quilting(5)),
    "tvm": (lambda: create_transform("tvm:keep_prob=1.0,iterations=20,seed=0"),
            lambda: create_transform("tvm:keep_prob=0.5,iterations=20,seed=0")),
    "shield": (lambda: create_transform("shield:qualities=50,block=4,seed=0"),
               lambda: create_transform("shield:qualities=20/90,block=4,seed=0")),
    "random-resize-pad": (lambda: create_transform("random-resize-pad:ratio=1.0,seed=0"),
                          lambda: create_transform("random-resize-pad:ratio=1.5,seed=0")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_an_option_that_removes_the_randomness_is_declared_on_the_instance(name, digits_model):
    off, on = CASES[name][0](), CASES[name][1]()
    assert type(off).randomized is True  # the class default is unchanged ...
    assert off.randomized is False and on.randomized is True  # ... each instance says what it does
    x = _images()
    # off: two calls (different generator states) give the same images; on: they differ
    assert torch.equal(off(x), off(x))
    assert not torch.equal(on(x), on(x))
    # the pipeline (what the evaluator reads to decide on EOT) follows the instances
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), digits_model)
    assert Defended([off], model).randomized is False
    assert Defended([off, on], model).randomized is True
    decl = Defended([off], model).declarations()[0]
    assert decl["randomized"] is False and decl["name"] == name


def test_attack_view_adds_eot_only_for_randomized_pipelines(digits_model):
    from bastion.attacks.adaptive import EOT
    from bastion.defenses.pipeline import AdaptiveView

    fixed = Defended([create_transform("bit-depth:bits=3")], digits_model)
    assert isinstance(fixed.attack_view(eot=7), AdaptiveView)
    noisy = Defended([create_transform("bit-depth:bits=3"), create_transform("gaussian-noise:sigma=0.1")], digits_model)
    view = noisy.attack_view(eot=7)
    assert isinstance(view, EOT) and view.n == 7 and isinstance(view.model, AdaptiveView)
    # the EOT module averages 7 draws of the real pipeline: its logits equal the mean of 7 seeded draws
    x = _images(3)[:, :, :8, :8]
    torch.manual_seed(5)
    z = view(x)
    torch.manual_seed(5)
    draws = noisy(x.repeat(7, 1, 1, 1)).reshape(7, 3, -1).mean(0)
    assert torch.allclose(z, draws, atol=1e-5)
    with pytest.raises(ValueError, match="`eot` must be an int >= 1"):
        noisy.attack_view(eot=0)


def test_adapt_model_widens_the_first_layer_even_when_a_head_is_a_shallower_sibling():
    from torch import nn

    from bastion.defenses.transforms.thermometer import Thermometer, adapt_model

    class Net(nn.Module):  # the zoo's layout: features (nested) first, then a Linear head as a direct child
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
            self.head = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.head(self.features(x))

    torch.manual_seed(0)
    net = Net()
    wide = adapt_model(net, 8, channels=1)
    assert wide.features[0].in_channels == 8 and wide.head.in_features == 4 * 6 * 6  # the head is untouched
    x = torch.rand(2, 1, 6, 6)
    assert wide(Thermometer(8)(x)).shape == (2, 3)
    assert adapt_model(nn.Conv2d(1, 2, 3), 4).in_channels == 4  # a bare layer is widened itself
