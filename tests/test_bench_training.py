"""benchmarks/training.py: method lists, run folders, and the tables it assembles (no training here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.spec_from_file_location("bench_training", ROOT / "training.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_training"] = mod  # dataclasses look their module up while being built
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("bench_training", None)
        sys.path.remove(str(ROOT))


def test_parse_methods(bench):
    assert bench.parse_methods("standard,fgsm-at@0.3,fgsm-at") == [("standard", None), ("fgsm-at", 0.3),
                                                                    ("fgsm-at", None)]
    fast = bench.parse_methods("fast,standard")
    assert fast[0] == ("standard", None) and ("fast-at", None) in fast and len(fast) == len(set(fast))
    assert ("distillation-teacher", None) not in bench.parse_methods("all")
    with pytest.raises(SystemExit, match="unknown method 'pgd'"):
        bench.parse_methods("pgd")


def test_run_folders_name_the_setting(bench, tmp_path):
    s = bench.Setting("mnist-5k", None, 4, 100, 0.1, tmp_path, "cpu", 8, "apgd-ce", 64)
    assert bench.run_dir(s, "fgsm-at", 0.3).name == "fgsm-at-0.3-nall-e4-b64"
    assert bench.run_dir(s, "standard", 0.3).name == "standard-nall-e4-b64"   # not adversarial: no eps
    assert bench.run_dir(s, "sap", 0.1).name == "sap-nall-e4-b64"


def _row(method, eps, clean, fgsm, pgd, suite, t):
    return {"method": method, "eps": eps, "folder": "", "train": {"train_time_s": t, "stopped": None},
            "eval": {"clean": clean, "fgsm": fgsm, "pgd20": pgd, "standard": suite}}


def test_table_and_findings(bench, tmp_path):
    s = bench.Setting("fashion-mnist", 10000, 3, 100, 0.1, tmp_path, "cpu", 8, "standard")
    rows = [_row("standard", 0.1, 0.9, 0.1, 0.0, 0.0, 10.0), _row("fgsm-at", 0.3, 0.8, 0.9, 0.1, 0.0, 30.0),
            _row("pgd-at", 0.1, 0.85, 0.7, 0.7, 0.6, 120.0), _row("fast-at", 0.1, 0.86, 0.7, 0.66, 0.57, 30.0),
            {"method": "trades", "eps": 0.1, "folder": "", "train": None, "eval": None}]
    text = bench.table(s, rows)
    assert "| fgsm-at | 0.3 | 80.0 | 90.0 | 10.0 | 0.0 | 30 | 3.0 |" in text
    assert "| trades | 0.1 | not measured |" in text
    found = "\n".join(bench.findings(rows))
    assert "fgsm-at at eps 0.3" in found and "catastrophic overfitting (robust" in found
    assert "fast-at at eps 0.1" in found and "no catastrophic overfitting" in found
    assert "95% of PGD-AT's robust accuracy" in found and "25% of its training time" in found and "met" in found
