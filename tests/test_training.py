"""The Trainer: learning, run folders, exact resume (also after SIGKILL), checkpoints, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.checkpoint import CheckpointError, load_checkpoint, load_model, read_checkpoint, save_checkpoint
from bastion.data import Dataset, load_dataset
from bastion.defenses.training import (
    Objective,
    RunExistsError,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    WeightAverage,
    create_objective,
    make_schedule,
)
from bastion.models import create_model

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def digits_ds() -> tuple[Dataset, Dataset]:
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _model(ds: Dataset, name: str = "mlp", **kw) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, ds.num_classes, ds.shape, ds.mean, ds.std, **kw)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=64, lr=0.05, schedule="onecycle", seed=3, checkpoint_every=0)
    base.update(kw)
    return TrainConfig(**base)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_standard_training_learns_and_writes_run_folder(digits_ds, tmp_path):
    tr, te = digits_ds
    m = _model(tr, "mlp")
    report = Trainer(m, tr, te, _cfg(epochs=4, batch_size=32), run_dir=tmp_path / "run", progress=False).fit()
    assert report["final"]["test_acc"] > 0.9
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "report.json", "model.json", "model.safetensors"):
        assert (run / name).is_file(), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["name"] == "mlp" and cfg["train"]["epochs"] == 4
    # The final model reloads from the run folder alone (architecture from JSON, weights from safetensors).
    again = load_model(run)
    x = te.images[:16]
    assert torch.equal(again(x).argmax(1), m.eval()(x).argmax(1))


def test_resume_in_process_is_bit_identical(digits_ds, tmp_path):
    """Stop after a mid-epoch checkpoint (simulated crash), resume, compare with an uninterrupted run."""
    tr, te = digits_ds
    ref = _model(tr)
    Trainer(ref, tr, te, _cfg(), progress=False).fit()

    class Crash(Objective):
        name = "crash"

        def __init__(self, at: int) -> None:
            self.calls, self.at = 0, at

        def loss(self, model, x, y):
            self.calls += 1
            if self.calls > self.at:
                raise KeyboardInterrupt
            logits = model(x)
            return nn.functional.cross_entropy(logits, y), logits

        def config(self):
            return {"name": "standard", "label_smoothing": 0.0}

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(_model(tr), tr, te, _cfg(checkpoint_every=7), Crash(at=31), run_dir=run, progress=False).fit()
    states = [json.loads(p.read_text())["state"] for p in (run / "checkpoints").glob("ckpt-*.json")]
    assert max(s["step"] for s in states) == 28 and any(s["batch"] != 0 for s in states)  # a mid-epoch checkpoint
    resumed = _model(tr)
    Trainer(resumed, tr, te, _cfg(checkpoint_every=7), run_dir=run, resume=True, progress=False).fit()
    a, b = _weights(ref), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    e = dict(os.environ, PYTHONPATH=str(TESTS), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "bastion.cli", "-q", *args], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_mid_epoch_is_bit_identical(tmp_path):
    """The real thing: a separate process killed with SIGKILL mid-epoch, then `--resume`."""
    common = ["train", "--data", "digits", "--model", "slow_factory:build", "--model-opt", "delay=0.004",
              "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--seed", "5", "--no-progress"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    p = _cli(*common, "--out", str(ref))
    assert p.wait(timeout=120) == 0, p.stderr.read()

    p = _cli(*common, "--out", str(run), "--checkpoint-every", "5")
    deadline = time.time() + 60
    killed_state = None
    while time.time() < deadline and p.poll() is None:
        for j in (run / "checkpoints").glob("ckpt-*.json") if (run / "checkpoints").exists() else []:
            try:
                st = json.loads(j.read_text())["state"]
            except (json.JSONDecodeError, OSError):
                continue
            if st["epoch"] >= 1 and st["batch"] > 0:  # in the middle of the second epoch
                killed_state = st
                break
        if killed_state:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    p.wait(timeout=30)
    assert killed_state is not None and p.returncode == -signal.SIGKILL, "the run was not killed mid-epoch"
    assert not (run / "model.json").exists()

    p = _cli(*common, "--out", str(run), "--checkpoint-every", "5", "--resume")
    assert p.wait(timeout=120) == 0, p.stderr.read()
    a, _ = read_checkpoint(ref / "model")
    b, _ = read_checkpoint(run / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_second_run_into_same_folder_is_refused(digits_ds, tmp_path):
    tr, te = digits_ds
    run = tmp_path / "run"
    Trainer(_model(tr), tr, te, _cfg(epochs=1), run_dir=run, progress=False).fit()
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(RunExistsError, match="already holds a run"):
        Trainer(_model(tr), tr, te, _cfg(epochs=1), run_dir=run, progress=False).fit()
    with pytest.raises(RunExistsError, match="configuration differs"):
        Trainer(_model(tr), tr, te, _cfg(epochs=1, lr=0.01), run_dir=run, resume=True, progress=False).fit()
    assert (run / "model.safetensors").read_bytes() == before


def test_resume_of_a_run_written_before_an_option_existed(digits_ds, tmp_path):
    """A config.json that lacks an option added later (amp, channels_last) resumes at its default only."""
    tr, te = digits_ds
    run = tmp_path / "run"
    cfg = _cfg(epochs=2)
    Trainer(_model(tr), tr, te, cfg, run_dir=run, progress=False).fit()
    saved = json.loads((run / "config.json").read_text())
    for key in ("amp", "channels_last", "ema_decay"):
        del saved["train"][key]
    del saved["objective"]["label_smoothing"]
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(RunExistsError, match="train configuration differs"):
        Trainer(_model(tr), tr, te, _cfg(epochs=2, amp="bf16"), run_dir=run, resume=True, progress=False).fit()
    with pytest.raises(RunExistsError, match="objective configuration differs"):
        Trainer(_model(tr), tr, te, cfg, create_objective("standard", label_smoothing=0.1), run_dir=run, resume=True,
                progress=False).fit()
    report = Trainer(_model(tr), tr, te, cfg, run_dir=run, resume=True, progress=False).fit()
    assert report["epochs"] == 2 and report["steps"] == 2 * math.ceil(len(tr) / 64)


def test_resume_tolerates_float_rounding_of_the_saved_config_only(digits_ds, tmp_path):
    """A data set's std recomputed in another summation order (last digits differ) still resumes; 1e-6 does not."""
    tr, te = digits_ds
    run = tmp_path / "run"
    Trainer(_model(tr), tr, te, _cfg(epochs=1), run_dir=run, progress=False).fit()
    saved = json.loads((run / "config.json").read_text())
    std = saved["model"]["std"][0]
    saved["model"]["std"][0] = std * (1 + 2e-14)
    (run / "config.json").write_text(json.dumps(saved))
    assert Trainer(_model(tr), tr, te, _cfg(epochs=1), run_dir=run, resume=True, progress=False).fit()["epochs"] == 1
    saved["model"]["std"][0] = std * (1 + 1e-6)
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(RunExistsError, match="model configuration differs"):
        Trainer(_model(tr), tr, te, _cfg(epochs=1), run_dir=run, resume=True, progress=False).fit()


def test_non_empty_folder_and_unwritable_folder(digits_ds, tmp_path):
    tr, te = digits_ds
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("precious")
    with pytest.raises(RunExistsError, match="not empty"):
        Trainer(_model(tr), tr, te, _cfg(epochs=1), run_dir=tmp_path / "busy", progress=False).fit()
    assert (tmp_path / "busy" / "notes.txt").read_text() == "precious"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="run_dir.*not writable"):
        Trainer(_model(tr), tr, te, _cfg(epochs=1), run_dir=blocker / "run", progress=False).fit()


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_checkpoint(digits_ds, tmp_path):
    tr, te = digits_ds

    class NaNAt(Objective):
        name = "nan"

        def __init__(self) -> None:
            self.calls = 0

        def loss(self, model, x, y):
            self.calls += 1
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            return (loss * float("nan") if self.calls == 30 else loss), logits

    run = tmp_path / "run"
    steps = math.ceil(len(tr) / 64)  # 23 steps per epoch: step 30 is epoch 2, batch 7
    with pytest.raises(TrainingDiverged, match=r"epoch 2, batch 7.*ckpt-0*23"):
        Trainer(_model(tr), tr, te, _cfg(), NaNAt(), run_dir=run, progress=False).fit()
    _, meta = read_checkpoint(run / "checkpoints" / f"ckpt-{steps:09d}")
    assert meta["state"]["epoch"] == 1
    assert not (run / "model.json").exists()


def test_checkpoint_round_trip_and_architecture_mismatch(digits_ds, tmp_path):
    tr, _ = digits_ds
    m = _model(tr)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    loss = m(tr.images[:8]).logsumexp(1).mean()
    loss.backward()
    opt.step()
    save_checkpoint(tmp_path / "c", m, optimizer=opt, state={"note": "hi"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.safetensors"]
    m2 = _model(tr)
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
    _, meta = load_checkpoint(tmp_path / "c", m2, opt2)
    assert meta["state"] == {"note": "hi"}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and float(s1["step"]) == float(s2["step"])
    other = _model(tr, "cnn-small")
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(tmp_path / "c", other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "c.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "c", m2)


def test_schedules():
    total = 100
    cyc = make_schedule("cyclic", 0.2, total)
    assert abs(max(cyc(s) for s in range(total)) - 0.2) < 1e-9 and cyc(total - 1) == 0.0
    cos = make_schedule("cosine", 0.1, total)
    assert cos(0) == pytest.approx(0.1) and cos(total) == pytest.approx(0.0, abs=1e-12)
    step = make_schedule("step", 1.0, total)
    assert (step(0), step(50), step(80)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))
    one = make_schedule("onecycle", 1.0, total)
    assert one(0) < one(29) == pytest.approx(1.0) and one(99) < 0.01
    warm = make_schedule("constant", 1.0, total, warmup_steps=10)
    assert warm(0) == pytest.approx(0.1) and warm(50) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("linear", 0.1, 10)


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"optimizer": "rmsprop"}, "optimizer"),
    ({"schedule": "exp"}, "schedule"), ({"batch_size": 2.5}, "batch_size"), ({"augment": "mixup"}, "augment"),
    ({"ema_decay": 1.0}, "ema_decay"), ({"ema_decay": -0.1}, "ema_decay"), ({"ema_decay": "0.99"}, "ema_decay"),
])
def test_bad_train_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainConfig(**kwargs)


def test_bad_trainer_arguments(digits_ds):
    tr, te = digits_ds
    with pytest.raises(TypeError, match="`train` must be a bastion Dataset"):
        Trainer(_model(tr), (tr.images, tr.labels), te)  # type: ignore[arg-type]
    fm = load_dataset("mnist-5k", "test").take(10)
    with pytest.raises(ValueError, match="`test` images have shape"):
        Trainer(_model(tr), tr, fm)
    with pytest.raises(ValueError, match="label_smoothing"):
        create_objective("standard", label_smoothing=2.0)
    with pytest.raises(ValueError, match="unknown defense 'madry'.*standard"):
        create_objective("madry")


def test_bad_dataset_values_are_refused():
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"`images` must have values in \[0, 1\]"):
        Dataset("d", "train", x * 3, torch.zeros(4, dtype=torch.long), ["a", "b"], (0.5,), (0.5,))
    with pytest.raises(ValueError, match="`images` contains NaN"):
        Dataset("d", "train", x.masked_fill(x > 0.5, float("nan")), torch.zeros(4, dtype=torch.long), ["a", "b"], (0.5,), (0.5,))
    with pytest.raises(ValueError, match=r"`labels` must hold class indices in \[0, 1\]"):
        Dataset("d", "train", x, torch.tensor([0, 1, 2, 0]), ["a", "b"], (0.5,), (0.5,))
    with pytest.raises(ValueError, match="N×C×H×W"):
        Dataset("d", "train", x[:, 0], torch.zeros(4, dtype=torch.long), ["a", "b"], (0.5,), (0.5,))
    with pytest.raises(TypeError, match="floating-point"):
        Dataset("d", "train", (x * 255).to(torch.uint8), torch.zeros(4, dtype=torch.long), ["a", "b"], (0.5,), (0.5,))


def test_objective_hooks_replays_stop_and_state(digits_ds, tmp_path):
    """Replays give m optimizer steps per batch; StopTraining restores and ends; state is checkpointed."""
    tr, te = digits_ds
    from bastion.defenses.training import StopTraining

    class Hooked(Objective):
        name = "hooked"

        def __init__(self) -> None:
            self.steps = 0
            self.counter = torch.zeros(1)
            self.snapshot = None

        @property
        def replays(self) -> int:
            return 2

        def loss(self, model, x, y):
            logits = model(x)
            return nn.functional.cross_entropy(logits, y), logits

        def after_step(self, model):
            self.steps += 1
            self.counter += 1

        def on_epoch_end(self, model, epoch):
            if epoch == 1:
                self.snapshot = {k: v.clone() for k, v in model.state_dict().items()}
                return {"probe": 1.0}
            raise StopTraining("probe collapsed", restore=self.snapshot)

        def state_dict(self):
            return {"counter": self.counter}

        def load_state_dict(self, state):
            self.counter = state["counter"].clone()

    obj = Hooked()
    m = _model(tr)
    report = Trainer(m, tr, te, _cfg(epochs=5), obj, run_dir=tmp_path / "run", progress=False).fit()
    per_epoch = math.ceil(len(tr) / 64)
    assert obj.steps == 2 * 2 * per_epoch                    # 2 epochs ran, 2 steps per batch
    assert report["stopped"] == "probe collapsed" and report["epochs"] == 2
    assert all(torch.equal(v, obj.snapshot[k]) for k, v in m.state_dict().items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["probe"] == 1.0 and rows[1]["stopped"] == "probe collapsed"
    tensors, _ = read_checkpoint(sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*.json"))[-1])
    assert float(tensors["extra.objective.counter"]) == obj.steps


def test_resume_with_tuple_model_options(digits_ds, tmp_path):
    """A model option given as a tuple comes back from JSON as a list: resume must still match."""
    tr, te = digits_ds
    run = tmp_path / "run"
    Trainer(_model(tr, hidden=(32,)), tr, te, _cfg(epochs=1), run_dir=run, progress=False).fit()
    Trainer(_model(tr, hidden=(32,)), tr, te, _cfg(epochs=1), run_dir=run, resume=True, progress=False).fit()
    load_checkpoint(run / "model", _model(tr, hidden=(32,)))


def test_accuracy_counts_every_image_across_batches():
    from bastion.defenses.training.trainer import accuracy
    torch.manual_seed(0)
    x = torch.rand(30, 1, 4, 4)
    data = Dataset("toy", "test", x, (x.mean((1, 2, 3)) > 0.5).long(), ["low", "high"], (0.5,), (0.3,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with torch.no_grad():   # predicts class 1 when the mean pixel exceeds 0.5: right on every image
        model[1].weight.copy_(torch.stack([-torch.ones(16), torch.ones(16)]) / 16)
        model[1].bias.copy_(torch.tensor([0.5, -0.5]))
    model.train()
    assert accuracy(model, data, batch_size=7)[0] == 1.0
    assert model.training   # restored
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([10.0, -10.0]))   # always class 0
    acc, loss = accuracy(model, data, batch_size=7)
    assert acc == pytest.approx(float((data.labels == 0).float().mean())) and 0 < acc < 1
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(model(x), data.labels).detach()), rel=1e-5)


def test_weight_average_matches_the_hand_computed_average():
    """avg <- d_t·avg + (1 − d_t)·w with d_t = min(decay, (1 + t) / (10 + t)); integer buffers are copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(0.0)
    avg = WeightAverage(model, decay=0.9)
    expected = 0.0
    for t, w in enumerate([1.0, 2.0, -3.0, 0.5] + [4.0] * 20, start=1):
        with torch.no_grad():
            model[0].weight.fill_(w)
        model.train()(torch.randn(4, 1))  # moves the batch-norm statistics and its step counter
        avg.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * w
        assert float(avg.shadow["0.weight"]) == pytest.approx(expected, rel=1e-6)
    assert int(avg.shadow["1.num_batches_tracked"]) == 24   # copied, not averaged
    assert float(avg.shadow["1.running_mean"]) != float(model[1].running_mean)  # averaged, not copied
    with avg.swapped(model):
        assert float(model[0].weight.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(model[0].weight.detach()) == 4.0   # the model's own weights come back
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def test_trainer_ema_is_the_average_of_the_trajectory_and_the_final_model(digits_ds, tmp_path):
    """The run's model is the average of the weights after every optimizer step, computed here by hand;
    the per-epoch test accuracy is the averaged model's; the trajectory itself is unchanged."""
    tr, te = digits_ds

    class Recording(type(create_objective("standard"))):  # folds each step's weights into a hand average
        def __init__(self) -> None:
            super().__init__()
            self.avg: dict[str, torch.Tensor] | None = None
            self.t = 0

        def after_step(self, model):
            w = _weights(model)
            if self.avg is None:
                self.avg = {k: v.clone() for k, v in self.init.items()}
            self.t += 1
            d = min(0.99, (1 + self.t) / (10 + self.t))
            self.avg = {k: d * self.avg[k] + (1 - d) * w[k] for k in w}

    raw = _model(tr)
    Trainer(raw, tr, te, _cfg(epochs=2), progress=False).fit()
    m = _model(tr)
    rec = Recording()
    rec.init = _weights(m)
    report = Trainer(m, tr, te, _cfg(epochs=2, ema_decay=0.99), rec, run_dir=tmp_path / "run", progress=False).fit()
    final = _weights(m)
    assert all(torch.allclose(final[k], rec.avg[k], atol=1e-6) for k in final)
    assert not all(torch.allclose(final[k], _weights(raw)[k], atol=1e-3) for k in final)  # not the last weights
    assert "moving average" in report["weights"]
    from bastion.defenses.training import accuracy
    assert report["final"]["test_acc"] == pytest.approx(accuracy(m, te)[0])
    again = load_model(tmp_path / "run")
    assert torch.equal(again(te.images[:32]), m.eval()(te.images[:32]))


def test_trainer_ema_resumes_bit_identically(digits_ds, tmp_path):
    tr, te = digits_ds
    ref = _model(tr)
    Trainer(ref, tr, te, _cfg(ema_decay=0.95), progress=False).fit()

    class Crash(type(create_objective("standard"))):
        calls = 0

        def loss(self, model, x, y):
            type(self).calls += 1
            if type(self).calls > 40:
                raise KeyboardInterrupt
            return super().loss(model, x, y)

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(_model(tr), tr, te, _cfg(ema_decay=0.95, checkpoint_every=9), Crash(), run_dir=run,
                progress=False).fit()
    resumed = _model(tr)
    Trainer(resumed, tr, te, _cfg(ema_decay=0.95, checkpoint_every=9), run_dir=run, resume=True, progress=False).fit()
    a, b = _weights(ref), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RunExistsError, match="train configuration differs"):
        Trainer(_model(tr), tr, te, _cfg(ema_decay=0.9, checkpoint_every=9), run_dir=run, resume=True,
                progress=False).fit()
