"""ThreatModel geometry (norms, projection, random start, steepest-ascent step, parsing) and ExampleRNG."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from bastion._rng import ExampleRNG
from bastion.threat import L0, L1, L2, Linf, Norm, ThreatModel, norm_of, project_l1_ball

EPS = {"linf": 0.1, "l2": 0.8, "l1": 3.0, "l0": 5}
NORMS = list(EPS)


def threat(norm: str) -> ThreatModel:
    return ThreatModel(norm, EPS[norm])


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 4, 4, generator=g)
    x[:4] = x[:4].round()  # some examples sit on the box's faces
    return x


def far_points(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return x + torch.randn(x.shape, generator=g)  # far outside both the ball and the box


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("spec,norm,eps", [
    ("linf:8/255", Norm.LINF, 8 / 255), ("Linf:0.1", Norm.LINF, 0.1), ("l2:0.5", Norm.L2, 0.5),
    ("l1:12", Norm.L1, 12.0), ("l0:10", Norm.L0, 10.0), ("l2:inf", Norm.L2, math.inf), (" l2 : 1/2 ", Norm.L2, 0.5),
])
def test_parse(spec, norm, eps):
    t = ThreatModel.parse(spec)
    assert t.norm is norm and t.eps == eps


@pytest.mark.parametrize("spec,fragment", [
    ("linf", "NORM:EPS"), ("lx:3", "`norm`"), ("l2:abc", "eps 'abc'"), ("l2:-1", "`eps`"),
    ("l0:2.5", "whole number"), ("l2:0", "`eps`"), ("l2:1/0", "eps '1/0'"), ("linf:", "NORM:EPS"), ("l2:nan", "eps"),
])
def test_parse_errors_name_the_string(spec, fragment):
    with pytest.raises(ValueError) as e:
        ThreatModel.parse(spec)
    assert repr(spec) in str(e.value) and fragment in str(e.value)


def test_constructor_checks():
    assert Linf(0.1) == ThreatModel("linf", 0.1) == ThreatModel(Norm.LINF, 0.1)
    assert L2(1) == ThreatModel.parse("l2:1") and L1(2) == ThreatModel.parse("l1:2") and L0(3) == ThreatModel.parse("l0:3")
    assert str(L0(10)) == "l0:10" and str(Linf(0.5)) == "linf:0.5" and str(L2(math.inf)) == "l2:inf"
    with pytest.raises(ValueError, match="`norm`"):
        ThreatModel("l3", 1.0)
    with pytest.raises(TypeError, match="`eps`"):
        ThreatModel("l2", True)
    with pytest.raises(TypeError, match="`eps`"):
        ThreatModel("l2", "0.5")
    for bad in (0.0, -1.0, math.nan, -math.inf):
        with pytest.raises(ValueError, match="`eps`"):
            ThreatModel("linf", bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Linf(0.1).eps = 0.2  # type: ignore[misc]
    with pytest.raises(TypeError):
        ThreatModel.parse(0.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- norms
def test_norm_of_known_values():
    d = torch.tensor([[3.0, -4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]]).view(2, 1, 2, 2)
    assert torch.allclose(norm_of(d, "linf"), torch.tensor([4.0, 0.5]))
    assert torch.allclose(norm_of(d, "l2"), torch.tensor([5.0, 0.5]))
    assert torch.allclose(norm_of(d, "l1"), torch.tensor([7.0, 0.5]))
    assert torch.equal(norm_of(d, "l0"), torch.tensor([2.0, 1.0]))


# --------------------------------------------------------------------------- projection
@pytest.mark.parametrize("norm", NORMS)
def test_project_inside_and_idempotent(norm, x):
    t = threat(norm)
    z = far_points(x)
    p = t.project(z, x)
    assert bool(t.contains(p, x).all())
    assert p.min() >= 0 and p.max() <= 1
    assert torch.allclose(t.project(p, x), p, atol=1e-6)
    # points already inside are left alone
    inside = t.project(x + 0.01 * (z - x), x)
    assert torch.allclose(t.project(inside, x), inside, atol=1e-6)
    assert torch.equal(t.project(x, x), x)


def test_project_linf_is_clamp(x):
    z = far_points(x)
    expected = torch.max(torch.min(z, x + 0.1), x - 0.1).clamp(0, 1)
    assert torch.equal(Linf(0.1).project(z, x), expected)


def test_project_l2_reaches_the_sphere_when_box_is_slack():
    x = torch.full((4, 1, 3, 3), 0.5)
    z = x + 0.2 * torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    p = L2(0.1).project(z, x)
    assert torch.allclose(norm_of(p - x, "l2"), torch.full((4,), 0.1), atol=1e-6)
    # same direction as the original perturbation
    cos = torch.nn.functional.cosine_similarity((p - x).flatten(1), (z - x).flatten(1))
    assert torch.allclose(cos, torch.ones(4), atol=1e-5)


def _l1_reference(v: np.ndarray, eps: float) -> np.ndarray:
    """Projection onto the L1 ball by root-finding on the threshold (independent of sorting)."""
    if np.abs(v).sum() <= eps:
        return v
    theta = brentq(lambda th: np.maximum(np.abs(v) - th, 0).sum() - eps, 0.0, np.abs(v).max())
    return np.sign(v) * np.maximum(np.abs(v) - theta, 0)


def test_project_l1_matches_reference_and_is_nearest():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 7, generator=g, dtype=torch.float64) * torch.rand(50, 1, generator=g, dtype=torch.float64) * 3
    w = project_l1_ball(v, 1.0)
    ref = np.stack([_l1_reference(row, 1.0) for row in v.numpy()])
    assert np.allclose(w.numpy(), ref, atol=1e-9)
    assert (w.abs().sum(1) <= 1.0 + 1e-9).all()
    # nearest: no random point of the ball is closer to v
    q = torch.randn(50, 200, 7, generator=g, dtype=torch.float64)
    q = q / q.abs().sum(-1, keepdim=True) * torch.rand(50, 200, 1, generator=g, dtype=torch.float64)
    assert ((v - w).norm(dim=1).unsqueeze(1) <= (v.unsqueeze(1) - q).norm(dim=2) + 1e-12).all()


def test_project_l1_with_ties_and_zeros():
    v = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, -2.0, 0.0, 0.0]])
    w = project_l1_ball(v, 1.5)
    assert torch.allclose(w[0], torch.tensor([0.5, 0.5, 0.5, 0.0]))
    assert torch.equal(w[1], v[1])
    assert torch.allclose(w[2], torch.tensor([0.75, -0.75, 0.0, 0.0]))


def test_project_l0_keeps_largest_coordinates():
    x = torch.full((1, 1, 2, 3), 0.5)
    d = torch.tensor([0.1, -0.4, 0.2, 0.05, -0.3, 0.0]).view(1, 1, 2, 3)
    p = L0(2).project(x + d, x)
    assert torch.allclose((p - x).flatten(), torch.tensor([0.0, -0.4, 0.0, 0.0, -0.3, 0.0]))


def test_unbounded_threat_only_clips_to_box(x):
    z = far_points(x)
    assert torch.equal(L2(math.inf).project(z, x), z.clamp(0, 1))
    assert bool(L2(math.inf).contains(z.clamp(0, 1), x).all())
    assert not L2(math.inf).bounded and Linf(0.1).bounded


def test_contains_tolerance_and_box(x):
    t = Linf(0.1)
    assert bool(t.contains((x + 0.1).clamp(0, 1), x).all())
    assert not bool(t.contains((x + 0.1 + 1e-4).clamp(0, 1), x)[4:].any())
    off_box = x.clone()
    off_box[0, 0, 0, 0] = 1.0 + 1e-3
    assert not bool(t.contains(off_box, x)[0]) and bool(t.contains(off_box, x)[1:].all())


# --------------------------------------------------------------------------- random start
@pytest.mark.parametrize("norm", NORMS)
def test_random_init_inside_and_reproducible(norm, x):
    t = threat(norm)
    rng = ExampleRNG(0, x)
    a = t.random_init(x, rng, tag="a")
    assert bool(t.contains(a, x).all())
    assert torch.equal(a, t.random_init(x, ExampleRNG(0, x), tag="a"))
    assert not torch.equal(a, t.random_init(x, rng, tag="b"))
    assert (norm_of(a - x, "l0") > 0).all()  # it does move every example


def test_random_init_distributions():
    x = torch.full((2000, 1, 4, 4), 0.5)
    x = x + torch.linspace(-1e-3, 1e-3, 2000).view(-1, 1, 1, 1)  # distinct examples, distinct keys
    rng = ExampleRNG(0, x)
    d = Linf(0.2).random_init(x, rng) - x
    assert abs(float(d.mean())) < 0.003 and abs(float(d.var()) - 0.2**2 / 3) < 0.001
    r = norm_of(L2(0.2).random_init(x, rng) - x, "l2") / 0.2
    # uniform in the 16-dim ball: P(r <= s) = s^16
    assert abs(float((r <= 0.9).float().mean()) - 0.9**16) < 0.03
    r1 = norm_of(L1(0.2).random_init(x, rng) - x, "l1") / 0.2
    assert abs(float((r1 <= 0.9).float().mean()) - 0.9**16) < 0.03
    assert torch.equal(norm_of(L0(3).random_init(x, rng) - x, "l0"), torch.full((2000,), 3.0))


def test_random_init_unbounded_is_uniform_in_box():
    x = torch.linspace(0, 1, 64).view(-1, 1, 1, 1).expand(64, 3, 4, 4).contiguous()
    a = Linf(math.inf).random_init(x, ExampleRNG(0, x))
    assert a.min() >= 0 and a.max() <= 1
    assert abs(float(a.mean()) - 0.5) < 0.02 and abs(float(a.var()) - 1 / 12) < 0.01


# --------------------------------------------------------------------------- steps
def test_direction_per_norm():
    g = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Linf(0.1).direction(g), g.sign())
    d2 = L2(1.0).direction(g)
    assert torch.allclose(norm_of(d2, "l2"), torch.ones(6))
    d1 = L1(1.0).direction(g, l1_fraction=0.25)  # 4 of 16 coordinates
    assert torch.allclose(norm_of(d1, "l1"), torch.ones(6))
    assert torch.equal(norm_of(d1, "l0"), torch.full((6,), 4.0))
    top = g.flatten(1).abs().topk(4, dim=1).indices
    assert torch.equal((d1.flatten(1).gather(1, top) != 0).all(1), torch.ones(6, dtype=torch.bool))
    assert (d1.flatten(1) * g.flatten(1) >= 0).all()
    single = L1(1.0).direction(g, l1_fraction=0.0)
    assert torch.equal(norm_of(single, "l0"), torch.ones(6))
    assert torch.equal(single.flatten(1).abs().argmax(1), g.flatten(1).abs().argmax(1))


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_direction_is_steepest_ascent(norm):
    """For a linear loss g·x, the direction beats every random unit-norm direction."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 1, 3, 3, generator=gen)
    t = threat(norm)
    best = (t.direction(g, l1_fraction=0.0) * g).flatten(1).sum(1)
    r = torch.randn(500, 4, 1, 3, 3, generator=gen)
    r = r / norm_of(r.flatten(0, 1), norm).view(500, 4, 1, 1, 1)
    assert ((r * g).flatten(2).sum(2) <= best + 1e-5).all()


def test_l1_direction_skips_coordinates_blocked_by_the_box():
    x = torch.tensor([[1.0, 0.5, 0.0, 0.5]]).view(1, 1, 2, 2)
    g = torch.tensor([[5.0, 1.0, -4.0, -2.0]]).view(1, 1, 2, 2)  # the two largest push out of the box
    d = L1(1.0).direction(g, x, l1_fraction=0.0)
    assert torch.equal(d.flatten(), torch.tensor([0.0, 0.0, 0.0, -1.0]))


@pytest.mark.parametrize("norm", ["linf", "l2", "l1", "l0"])
def test_zero_gradient_gives_zero_step(norm):
    x = torch.full((2, 1, 2, 2), 0.5)
    out = threat(norm).step(x, torch.zeros_like(x), 0.1)
    assert torch.equal(out, x)


def test_step_with_per_example_sizes():
    x = torch.full((2, 1, 2, 2), 0.5)
    g = torch.ones_like(x)
    out = Linf(0.5).step(x, g, torch.tensor([0.1, 0.2]))
    assert torch.allclose(out[0], torch.full((1, 2, 2), 0.6)) and torch.allclose(out[1], torch.full((1, 2, 2), 0.7))
    with pytest.raises(ValueError, match="`l1_fraction`"):
        L1(1.0).step(x, g, 0.1, l1_fraction=1.5)


# --------------------------------------------------------------------------- ExampleRNG
@pytest.fixture
def many() -> torch.Tensor:
    return torch.rand(4000, 5, generator=torch.Generator().manual_seed(0))


def test_rng_statistics(many):
    rng = ExampleRNG(0, many)
    u = rng.uniform((50,))
    assert u.min() > 0 and u.max() <= 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.003
    z = rng.normal((50,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1) < 0.02
    assert abs(float(((z.double() ** 4).mean())) - 3) < 0.1  # Gaussian kurtosis, not just two moments
    s = rng.rademacher((50,))
    assert set(s.unique().tolist()) == {-1.0, 1.0} and abs(float(s.mean())) < 0.01
    k = rng.randint(7, (50,))
    counts = torch.bincount(k.flatten(), minlength=7).double() / k.numel()
    assert k.min() == 0 and k.max() == 6 and (counts - 1 / 7).abs().max() < 0.005
    w = rng.sample_without_replacement(10, 4)
    assert w.shape == (4000, 4) and (w.sort(1).values.diff(dim=1) > 0).all()
    assert (torch.bincount(w.flatten(), minlength=10).double() / w.numel() - 0.1).abs().max() < 0.01


def test_rng_independence(many):
    rng = ExampleRNG(0, many)
    a, b = rng.uniform((2,), tag="a"), rng.uniform((2,), tag="b")
    corr = lambda p, q: float(torch.corrcoef(torch.stack([p, q]))[0, 1])  # noqa: E731
    assert abs(corr(a[:, 0], b[:, 0])) < 0.05  # across tags
    assert abs(corr(a[:, 0], a[:, 1])) < 0.05  # across elements
    assert abs(corr(a[:-1, 0], a[1:, 0])) < 0.05  # across neighbouring examples
    c = ExampleRNG(1, many).uniform((2,), tag="a")
    assert abs(corr(a[:, 0], c[:, 0])) < 0.05  # across seeds


def test_rng_slice_reorder_and_subset_invariance(many):
    x = many[:64]
    rng = ExampleRNG(7, x)
    full = rng.normal((3, 2), tag=("init", 0))
    assert torch.equal(full[10:20], ExampleRNG(7, x[10:20]).normal((3, 2), tag=("init", 0)))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full[perm], ExampleRNG(7, x[perm]).normal((3, 2), tag=("init", 0)))
    idx = torch.tensor([3, 5, 40])
    assert torch.equal(rng.subset(idx).normal((3, 2), tag=("init", 0)), full[idx])
    mask = torch.zeros(64, dtype=torch.bool)
    mask[idx] = True
    assert torch.equal(rng.subset(mask).normal((3, 2), tag=("init", 0)), full[idx])


def test_rng_counter_tags_and_seeds(many):
    x = many[:32]
    rng = ExampleRNG(0, x)
    first, second = rng.uniform(4), rng.uniform(4)
    assert not torch.equal(first, second)
    again = ExampleRNG(0, x)
    assert torch.equal(again.uniform(4), first) and torch.equal(again.uniform(4), second)
    assert not torch.equal(ExampleRNG(1, x).uniform(4, tag="t"), ExampleRNG(0, x).uniform(4, tag="t"))
    assert not torch.equal(ExampleRNG(2**40, x).uniform(4, tag="t"), ExampleRNG(0, x).uniform(4, tag="t"))
    assert ExampleRNG(0, x.double()).uniform(3).dtype == torch.float64
    with pytest.raises(TypeError, match="`seed`"):
        ExampleRNG(0.5, x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`tag`"):
        rng.uniform(3, tag=1.5)
    with pytest.raises(ValueError, match="`high`"):
        rng.randint(0, 3)
