"""`bastion train` gives Fast AT its cyclic schedule and Free AT its divided epoch budget, and says so."""

from __future__ import annotations

import json

import pytest

from bastion.cli import main
from bastion.defenses.training import DEFAULT_SCHEDULE, create_objective, paper_training_loop

# a tiny, fast run: 64 digits, an MLP, batch 32 (2 steps per epoch)
FAST = ["--data", "digits", "--train-limit", "64", "--test-limit", "32", "--model", "mlp", "--model-opt", "hidden=[16]",
        "--batch-size", "32", "--no-progress"]


def _train(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["train", *FAST, "--out", str(out), *extra]) == 0
    return out, json.loads((out / "config.json").read_text()), json.loads((out / "report.json").read_text())


def test_paper_training_loop_rules():
    fast = create_objective("fast-at", eps=0.1)
    assert paper_training_loop(fast, 10, None)[:2] == (10, "cyclic")
    assert paper_training_loop(fast, 10, "cosine") == (10, "cosine", [])   # the user's choice is kept, silently
    free = create_objective("free-at", eps=0.1, replays=4)
    epochs, schedule, notes = paper_training_loop(free, 10, None)
    assert (epochs, schedule) == (3, DEFAULT_SCHEDULE)                    # ceil(10 / 4)
    assert len(notes) == 1 and "ceil(10/4)" in notes[0] and "--epochs 40" in notes[0]
    assert paper_training_loop(free, 2, "step")[:2] == (1, "step")        # never below one epoch
    assert paper_training_loop(create_objective("pgd-at"), 7, None) == (7, DEFAULT_SCHEDULE, [])


def test_paper_training_loop_moved_but_old_name_resolves():
    import bastion.cli as cli
    from bastion.evaluation import harden

    assert cli.paper_training_loop is paper_training_loop and cli.DEFAULT_SCHEDULE == DEFAULT_SCHEDULE
    assert paper_training_loop.__module__ == "bastion.defenses.training.trainer"
    with pytest.raises(AttributeError):
        cli.no_such_name  # noqa: B018
    assert "from ..cli" not in __import__("inspect").getsource(harden)  # the library no longer imports the CLI


def test_fast_at_gets_the_cyclic_schedule(tmp_path, capsys):
    out, cfg, report = _train(tmp_path, "fast", "--defense", "fast-at", "--defense-opt", "overfit_check=false",
                              "--epochs", "2")
    assert cfg["train"]["schedule"] == "cyclic" and cfg["train"]["epochs"] == 2
    assert cfg["adjustments"]["requested"]["schedule"] is None
    assert cfg["adjustments"]["used"] == {"epochs": 2, "schedule": "cyclic"}
    assert any("cyclic" in n for n in cfg["adjustments"]["notes"])
    assert report["epochs"] == 2
    text = capsys.readouterr().out
    assert "note: fast-at: learning-rate schedule 'cyclic'" in text
    # the cyclic schedule ends near 0: the last epoch's learning rate is far below the peak (0.05)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] < 0.05 / 2


def test_explicit_schedule_is_kept(tmp_path, capsys):
    _, cfg, _ = _train(tmp_path, "fast-cos", "--defense", "fast-at", "--defense-opt", "overfit_check=false",
                       "--epochs", "1", "--schedule", "cosine")
    assert cfg["train"]["schedule"] == "cosine"
    assert cfg["adjustments"]["notes"] == []
    assert "note:" not in capsys.readouterr().out


def test_schedule_from_config_file_is_kept(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('defense = "fast-at"\nschedule = "step"\nepochs = 1\n[defense_opt]\noverfit_check = false\n')
    out = tmp_path / "run"
    assert main(["-q", "train", *FAST, "--config", str(toml), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["schedule"] == "step"


def test_free_at_divides_the_epochs(tmp_path, capsys):
    out, cfg, report = _train(tmp_path, "free", "--defense", "free-at", "--defense-opt", "replays=3",
                              "--epochs", "5")
    assert cfg["train"]["epochs"] == 2                       # ceil(5 / 3)
    assert cfg["adjustments"]["requested"]["epochs"] == 5
    assert report["epochs"] == 2 and report["steps"] == 2 * 2  # 2 epochs of 2 minibatches (each replayed 3 times)
    assert cfg["train"]["schedule"] == DEFAULT_SCHEDULE      # free-at has no schedule of its own
    text = capsys.readouterr().out
    assert "note: free-at: 2 epochs instead of 5" in text and "after 2 epochs" in text
    # resuming the same command resolves the same way (config.json matches)
    assert main(["-q", "train", *FAST, "--out", str(out), "--defense", "free-at", "--defense-opt", "replays=3",
                 "--epochs", "5", "--resume"]) == 0


def test_standard_training_is_unchanged(tmp_path, capsys):
    _, cfg, report = _train(tmp_path, "std", "--epochs", "2")
    assert cfg["train"]["schedule"] == DEFAULT_SCHEDULE == "onecycle" and report["epochs"] == 2
    assert cfg["adjustments"]["notes"] == [] and "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("defense", ["fast-at", "free-at"])
def test_help_mentions_the_paper_defaults(defense, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert defense in out


def test_ema_decay_option_makes_the_average_the_trained_model(tmp_path, capsys):
    out, cfg, report = _train(tmp_path, "ema", "--epochs", "2", "--ema-decay", "0.9")
    assert cfg["train"]["ema_decay"] == 0.9
    assert report["weights"] == "exponential moving average (decay 0.9)"
    _, cfg0, report0 = _train(tmp_path, "plain", "--epochs", "2")
    assert cfg0["train"]["ema_decay"] == 0.0 and report0["weights"] == "last"
    assert main(["train", *FAST, "--out", str(tmp_path / "bad"), "--ema-decay", "1.5"]) != 0
    assert "`ema_decay` must be a number in [0, 1)" in capsys.readouterr().err
