"""Speed options: same numbers as the default path, and the batch-size back-off."""

from __future__ import annotations

import pytest
import torch

from bastion.attacks import create_attack
from bastion.defenses.training import TrainConfig, Trainer
from bastion.speed import autocast, channels_last, find_batch_size, is_oom


def test_channels_last_gives_the_same_attack(digits, digits_model):
    x, y = digits["x_test"][:64], digits["y_test"][:64]
    pgd = create_attack("pgd", steps=5)
    ref = pgd(digits_model, x, y, "linf:0.1", seed=0)
    import copy
    m = channels_last(copy.deepcopy(digits_model))
    convs = [p for p in m.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    out = pgd(m, x, y, "linf:0.1", seed=0)
    assert (out.x_adv - ref.x_adv).abs().max() < 1e-4  # same attack up to rounding of the reordered sums
    assert (out.adv_pred == ref.adv_pred).float().mean() > 0.97


def test_find_batch_size_halves_on_oom():
    tried = []

    def run(bs: int) -> int:
        tried.append(bs)
        if bs > 100:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return bs * 2

    assert find_batch_size(run, 512) == (64, 128)
    assert tried == [512, 256, 128, 64]


def test_find_batch_size_gives_up_and_passes_other_errors():
    def oom(bs: int) -> None:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="even at batch size 4"):
        find_batch_size(oom, 16, minimum=4)

    def bug(bs: int) -> None:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        find_batch_size(bug, 16)
    with pytest.raises(ValueError, match="minimum"):
        find_batch_size(bug, 4, minimum=8)
    assert is_oom(RuntimeError("CUDA out of memory")) and not is_oom(RuntimeError("size mismatch"))


def test_bf16_autocast_and_config_checks(digits, digits_model):
    x = digits["x_test"][:8]
    with autocast("cpu", "bf16"):
        out = digits_model(x)
    assert out.dtype == torch.bfloat16
    with autocast("cpu", "none"):
        assert digits_model(x).dtype == torch.float32
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(TypeError, match="channels_last"):
        TrainConfig(channels_last="yes")


def test_trainer_with_bf16_and_channels_last_learns(tmp_path):
    from conftest import TinyCNN

    from bastion.data import load_dataset

    torch.manual_seed(0)
    model = TinyCNN()
    cfg = TrainConfig(epochs=4, batch_size=32, optimizer="adam", lr=3e-3, weight_decay=0.0, amp="bf16", channels_last=True,
                      device="cpu", seed=0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    report = Trainer(model, train.take(600), test.take(200), cfg, run_dir=tmp_path / "run", progress=False).fit()
    assert report["final"]["test_acc"] > 0.5  # bf16 forward passes still train the model
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
