"""benchmarks/training.py: method lists, run folders, the tables it assembles, and one tiny training (the EMA setting)."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("training.py") as mod:
        yield mod


def test_parse_methods(bench):
    assert bench.parse_methods("standard,fgsm-at@0.3,fgsm-at") == [("standard", None), ("fgsm-at", 0.3),
                                                                    ("fgsm-at", None)]
    fast = bench.parse_methods("fast,standard")
    assert fast[0] == ("standard", None) and ("fast-at", None) in fast and len(fast) == len(set(fast))
    everything = bench.parse_methods("all")
    assert ("distillation-teacher", None) not in everything
    assert ("fast-at-0.8eps", None) not in everything and ("fast-at-mixed", None) not in everything
    assert ("pgd-at", None) in everything and ("sap", None) in everything
    assert set(bench.parse_methods("all,variants")) == {(m, None) for m in bench.METHODS} - {("distillation-teacher", None)}
    with pytest.raises(SystemExit, match="unknown method 'pgd'"):
        bench.parse_methods("pgd")


def test_mixed_rows_use_fast_ats_adversary_at_the_rows_eps(bench):
    from bastion.defenses.training import create_objective
    opts = bench.METHODS["fast-at-mixed-a0.2"].options_at(0.2)
    assert opts == {"eps": 0.2, "alpha": 0.2,
                    "attacks": [{"name": "pgd", "steps": 1, "step_size": pytest.approx(0.25), "restarts": 1}]}
    assert bench.METHODS["fast-at-mixed"].options_at(0.1)["alpha"] == 0.5
    assert bench.METHODS["pgd-at"].options_at(0.3) == {"steps": 10, "eps": 0.3}
    objective = create_objective("fgsm-at", **opts)   # the registry accepts what the row trains with
    assert objective.alpha == 0.2 and objective.eps == 0.2


def test_smaller_ball_rows_train_below_the_evaluated_eps(bench, tmp_path):
    from bastion.defenses.training import create_objective
    objective = create_objective("fast-at", **bench.METHODS["fast-at-0.8eps"].options_at(0.1))
    assert objective.eps == pytest.approx(0.08)          # trained in the smaller ball ...
    assert bench.METHODS["fast-at-0.7eps"].options_at(0.2)["eps"] == pytest.approx(0.14)
    s = bench.Setting("fashion-mnist", None, 20, 1000, 0.1, tmp_path, "cpu", 8)
    assert bench.run_dir(s, "fast-at-0.8eps", 0.1).name == "fast-at-0.8eps-0.1-nall-e20"   # ... attacked at eps


def test_trades_b1_row_trades_at_the_clean_end(bench):
    from bastion.defenses.training import create_objective
    objective = create_objective("trades", **bench.METHODS["trades-b1"].options_at(0.1))
    assert objective.beta == 1.0 and objective.steps == 5 and objective.eps == pytest.approx(0.1)
    assert create_objective("trades", **bench.METHODS["trades"].options_at(0.1)).beta == 6.0   # the paper's row
    assert ("trades-b1", None) in bench.parse_methods("variants")
    assert ("trades-b1", None) not in bench.parse_methods("all")


def test_run_folders_name_the_setting(bench, tmp_path):
    s = bench.Setting("mnist-5k", None, 4, 100, 0.1, tmp_path, "cpu", 8, "apgd-ce", 64)
    assert bench.run_dir(s, "fgsm-at", 0.3).name == "fgsm-at-0.3-nall-e4-b64"
    assert bench.run_dir(s, "standard", 0.3).name == "standard-nall-e4-b64"   # not adversarial: no eps
    assert bench.run_dir(s, "sap", 0.1).name == "sap-nall-e4-b64"
    wide = bench.Setting("mnist-5k", None, 4, 100, 0.1, tmp_path, "cpu", 8, arch="madry-cnn")
    assert bench.run_dir(wide, "fast-at", 0.1).name == "fast-at-0.1-nall-e4-madry-cnn"
    assert bench.cost_path(tmp_path, "d", 512, 128, 0.1, "madry-cnn").name == "cost-n512-b128-eps0.1-madry-cnn.json"
    assert bench.cost_path(tmp_path, "d", 512, 128, 0.1).name == "cost-n512-b128-eps0.1.json"


def test_clean_accuracy_on_the_whole_split_is_its_own_column(bench, tmp_path):
    s = bench.Setting("fashion-mnist", None, 2, 100, 0.1, tmp_path, "cpu", 8)
    row = _row("fast-at", 0.1, 0.904, 0.84, 0.80, 0.78, 10.0)
    row["eval"]["clean_all"] = 0.886
    assert "| fast-at | 0.1 | 90.4 | 88.6 | 84.0 | 80.0 | 78.0 |" in bench.table(s, [row])


def _row(method, eps, clean, fgsm, pgd, suite, t):
    return {"method": method, "eps": eps, "folder": "", "train": {"train_time_s": t, "stopped": None},
            "eval": {"clean": clean, "fgsm": fgsm, "pgd20": pgd, "standard": suite}}


def test_table_and_findings(bench, tmp_path):
    s = bench.Setting("fashion-mnist", 10000, 3, 100, 0.1, tmp_path, "cpu", 8, "standard")
    rows = [_row("standard", 0.1, 0.9, 0.1, 0.0, 0.0, 10.0), _row("fgsm-at", 0.3, 0.8, 0.9, 0.1, 0.0, 30.0),
            _row("pgd-at", 0.1, 0.85, 0.7, 0.7, 0.6, 120.0), _row("fast-at", 0.1, 0.86, 0.7, 0.66, 0.57, 30.0),
            {"method": "trades", "eps": 0.1, "folder": "", "train": None, "eval": None}]
    text = bench.table(s, rows)
    assert "| fgsm-at | 0.3 | 80.0 | not measured | 90.0 | 10.0 | 0.0 | 30 | 3.0 |" in text
    assert "| trades | 0.1 | not measured |" in text
    found = "\n".join(bench.findings(rows))
    assert "fgsm-at at eps 0.3" in found and "catastrophic overfitting (robust" in found
    assert "fast-at at eps 0.1" in found and "no catastrophic overfitting" in found
    assert "95% of PGD-AT's robust accuracy" in found and "25% of its training time" in found and "met" in found


def _cost(rows, n=512):
    return {"n": n, "eps": 0.1, "rows": [{"method": m, "median_s": t, "ratio_to_standard": r, "replays": k,
                                          "samples_s": [t], "error": None} for m, t, r, k in rows]}


def test_cost_ratios_follow_the_epochs_each_method_trains(bench, tmp_path):
    res = _cost([("standard", 1.0, 1.0, 1), ("pgd-at", 9.0, 9.0, 1), ("fast-at", 2.0, 2.0, 1),
                 ("free-at", 8.0, 8.0, 8), ("distillation-teacher", 1.0, 1.0, 1), ("distillation", 1.5, 1.5, 1),
                 (bench.COST_PROBE, 0.5, 0.5, 1)])
    assert bench.training_cost_ratio(res, "pgd-at", 2) == 9.0
    assert bench.training_cost_ratio(res, "free-at", 2) == pytest.approx(4.0)    # 1 epoch of 8 replays for 2
    assert bench.training_cost_ratio(res, "free-at", 16) == pytest.approx(1.0)   # 2 such epochs for 16
    assert bench.training_cost_ratio(res, "distillation", 2) == pytest.approx(2.5)  # teacher + student
    assert bench.training_cost_ratio(res, "sap", 2) == 0.0
    assert bench.training_cost_ratio(res, "trades", 2) is None
    text = bench.cost_table(res, 2)
    assert "| free-at | 8.00 | 8.00 | 1 | 4.00 |" in text and "| pgd-at | 9.00 | 9.00 | 2 | 9.00 |" in text

    s = bench.Setting("fashion-mnist", 5000, 2, 100, 0.1, tmp_path, "cpu", 8, "apgd-ce", 64, cost_n=512)
    path = bench.cost_path(tmp_path, "fashion-mnist", 512, 64, 0.1)
    path.parent.mkdir(parents=True)
    path.write_text(__import__("json").dumps(res))
    rows = [_row("standard", 0.1, 0.9, 0.1, 0.0, 0.0, 10.0), _row("pgd-at", 0.1, 0.85, 0.7, 0.7, 0.6, 40.0),
            _row("fast-at", 0.1, 0.86, 0.7, 0.66, 0.57, 30.0), _row("fgsm-at", 0.3, 0.8, 0.9, 0.1, 0.0, 30.0)]
    text = bench.table(s, rows)
    assert "× standard (interleaved cost run) |" in text and "(as run) |\n" not in text
    assert "| pgd-at | 0.1 | 85.0 | not measured | 70.0 | 70.0 | 60.0 | 40 | 9.0 |" in text
    assert "| fgsm-at | 0.3 | 80.0 | not measured | 90.0 | 10.0 | 0.0 | 30 | not measured |" in text   # no fgsm-at in the cost run
    assert "| fast-at | 0.1 | 86.0 | not measured | 70.0 | 66.0 | 57.0 | 30 | 2.0 |" in text
    other_eps = bench.table(s, [_row("pgd-at", 0.3, 0.5, 0.4, 0.3, 0.2, 50.0)])
    assert "| pgd-at | 0.3 | 50.0 | not measured | 40.0 | 30.0 | 20.0 | 50 | 9.0 (timed at eps 0.1: same work per step) |" in other_eps
    found = "\n".join(bench.findings(rows, "apgd-ce", bench.load_cost(s), 2, 5000))
    assert "as run" not in found   # the cost run replaces the times taken at different loads
    # from the cost run: 2/9 = 22%; with the probe (0.5 s per epoch vs 1 s per 512 images) 2.0488/9 = 23%
    assert "95% of PGD-AT's robust accuracy in 22% of its training time (23% with its" in found
    assert found.rstrip().endswith("— target met")


def test_cost_run_times_every_method_once_per_round(bench, tmp_path):
    args = bench.parse_args(["--cost", "--data", "digits", "--methods", "free-at,distillation", "--cost-n", "64",
                             "--batch-size", "32", "--repeats", "1", "--root", str(tmp_path)])
    res = bench.cost(args)
    by = {r["method"]: r for r in res["rows"]}
    assert list(by) == ["standard", "free-at", "distillation-teacher", "distillation"]
    assert by["free-at"]["replays"] == 8 and by["standard"]["ratio_to_standard"] == 1.0
    assert all(r["error"] is None and len(r["samples_s"]) == 1 and r["median_s"] > 0 for r in res["rows"])
    # Free AT's epoch replays each batch 8 times: it cannot cost less than 2 standard epochs
    assert by["free-at"]["ratio_to_standard"] > 2


def test_a_naive_only_evaluation_shows_with_the_suite_not_measured(bench, tmp_path):
    s = bench.Setting("fashion-mnist", 5000, 2, 100, 0.1, tmp_path, "cpu", 8, "apgd-ce", 64)
    folder = bench.run_dir(s, "sap", 0.1)
    folder.mkdir(parents=True)
    cache = folder / "eval-linf0.1-n100-apgd-ce.json"
    bench.naive_cache_path(cache).write_text('{"clean": 0.8, "fgsm": 0.51, "pgd20": 0.5}')
    rows = bench.collect(s, [("sap", None)])
    assert rows[0]["eval"] == {"clean": 0.8, "fgsm": 0.51, "pgd20": 0.5}
    assert "| sap | 0.1 | 80.0 | not measured | 51.0 | 50.0 | not measured | 0 (reuses standard) | 0 |" in bench.table(s, rows)
    assert bench.findings(rows, "apgd-ce") == []


def test_suite_table_shows_what_each_attack_adds(bench):
    rows = [_row("label-smoothing", 0.1, 0.81, 0.5, 0.4, 0.28, 10.0), _row("trades", 0.1, 0.8, 0.6, 0.6, 0.55, 9.0),
            {"method": "mart", "eps": 0.1, "folder": "", "train": None, "eval": None}]
    rows[0]["eval"].update(per_attack={"apgd": 0.35, "apgd-t": 0.28, "square": 0.28}, standard_s=146.0)
    rows[1]["eval"].update(per_attack={"apgd": 0.56, "apgd-t": 0.55, "square": 0.55}, standard_s=300.0)
    text = bench.suite_table(rows)
    assert "| method | eps | clean % | PGD-20 % (naive) | apgd | + apgd-t | + square | suite s |" in text
    assert "| label-smoothing | 0.1 | 81.0 | 40.0 | 35.0 | 28.0 | 28.0 | 146 |" in text
    assert "mart" not in text   # not evaluated: no row
    rows[1]["eval"]["per_attack"] = {"apgd": 0.56}
    assert bench.suite_table(rows[1:]) == ""   # one attack: nothing to add to the main table


def test_ema_setting_trains_every_row_with_the_weight_average(bench, tmp_path):
    from bastion.data import load_dataset
    train, test = load_dataset("digits", "train").take(64), load_dataset("digits", "test").take(32)
    s = bench.Setting("digits", 64, 1, 32, 0.1, tmp_path, "cpu", 8, batch_size=32, ema_decay=0.999)
    out = bench.train_method(s, "fast-at", 0.1, train, test, progress=False)
    assert out.name == "fast-at-0.1-n64-e1-b32-ema0.999"   # never mixed up with the plain run's folder
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["ema_decay"] == 0.999 and config["objective"]["name"] == "fast-at"
    assert "moving average" in json.loads((out / "report.json").read_text())["weights"]
    plain = bench.Setting("digits", 64, 1, 32, 0.1, tmp_path, "cpu", 8, batch_size=32)
    assert bench.run_dir(plain, "fast-at", 0.1).name == "fast-at-0.1-n64-e1-b32"
