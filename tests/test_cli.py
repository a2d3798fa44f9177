"""The `bastion` command: list, train with a config file, demo, help, and clear errors."""

from __future__ import annotations

import json

import pytest

from bastion.cli import main, parse_kv


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("datasets:", "mnist-5k", "fashion-mnist", "cifar10", "imagefolder", "models:", "cnn-small",
                 "wide-resnet", "defenses:", "standard", "pgd-at", "trades", "attacks:", "apgd", "transforms:", "jpeg",
                 "bart", "detectors:", "mrr", "layers:", "bounded-relu", "sap", "thermometer-input"):
        assert word in out
    assert main(["list", "models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "preact-resnet18" in data["models"]


def test_train_with_a_layer_saves_a_model_that_rebuilds_it(tmp_path, capsys):
    """`--layer bounded-relu:t=0.5` trains the capped network, and `evaluate --model-path`
    (any loader of the run folder) gets the capped network back, not plain ReLUs."""
    import torch

    from bastion.checkpoint import load_model

    out = tmp_path / "capped"
    assert main(["-q", "train", "--data", "digits", "--model", "mlp", "--model-opt", "hidden=[32]", "--layer",
                 "bounded-relu:t=0.5", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    model = load_model(out)
    assert model.spec.layers == [{"name": "bounded-relu", "kwargs": {"t": 0.5}}]
    hidden = []
    for m in model.modules():
        if type(m).__name__ == "BoundedReLU":
            m.register_forward_hook(lambda mod, i, o: hidden.append(o))
    model(torch.rand(8, 1, 8, 8) * 4)
    assert hidden and max(h.max().item() for h in hidden) <= 0.5
    assert json.loads((out / "config.json").read_text())["model"]["layers"][0]["name"] == "bounded-relu"


def test_help_explains_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--config" in out and "learning-rate schedule" in out


def test_train_with_config_file_flags_override(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('data = "digits"\nmodel = "mlp"\nepochs = 5\nlr = 0.05\nbatch-size = 64\n'
                   '[model_opt]\nhidden = [64]\n')
    out = tmp_path / "run"
    assert main(["-q", "train", "--config", str(cfg), "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == 2            # the flag won over the file
    assert saved["train"]["batch_size"] == 64       # the file won over the default
    assert saved["model"]["kwargs"] == {"hidden": [64]}
    assert saved["cli"]["config"] == str(cfg) and saved["argv"][0] == "-q"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "test accuracy" in capsys.readouterr().out


def test_demo_runs_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--epochs", "1", "--audit-transform", "none", "--detector", "none", "--eval-limit", "20", "--harden", "none", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "clean test accuracy" in text
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["test_acc"] > 0.5           # one epoch on 4,000 real MNIST digits: far above chance
    assert main(["-q", "demo", "--epochs", "1", "--audit-transform", "none", "--detector", "none", "--eval-limit", "20", "--harden", "none", "--out", str(out),
                 "--no-progress"]) == 0
    assert (tmp_path / "demo-2" / "report.json").is_file()


@pytest.mark.parametrize("argv, match", [
    (["train", "--data", "mnist5", "--epochs", "1"], "unknown dataset 'mnist5'.*mnist-5k"),
    (["train", "--data", "digits", "--model", "resnet9000", "--epochs", "1"], "unknown model 'resnet9000'.*cnn-small"),
    (["train", "--data", "digits", "--defense", "madry", "--epochs", "1"], "unknown defense 'madry'"),
    (["train", "--data", "digits", "--model", "mlp", "--model-opt", "hiden=[4]", "--epochs", "1"], "bad options for model 'mlp'"),
])
def test_cli_errors_are_one_clear_line(argv, match, tmp_path, capsys):
    assert main(["-q", *argv, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(match, err), err


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochz = 3\n")
    with pytest.raises(SystemExit, match="unknown key.*epochz"):
        main(["train", "--config", str(bad)])
    with pytest.raises(SystemExit, match="not found"):
        main(["train", "--config", str(tmp_path / "nope.toml")])


def test_parse_kv():
    assert parse_kv("widen=4") == ("widen", 4)
    assert parse_kv("hidden=[8, 8]") == ("hidden", [8, 8])
    assert parse_kv("act=relu") == ("act", "relu")
    assert parse_kv("label-smoothing=0.1") == ("label_smoothing", 0.1)
