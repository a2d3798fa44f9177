"""Training under torchrun with 2 CPU processes (gloo): same result as one process, one writer,
and a run started with 2 processes resumes with 1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bastion.checkpoint import read_checkpoint

TESTS = Path(__file__).parent
COMMON = ["train", "--data", "digits", "--model", "slow_factory:build", "--model-opt", "delay=0.002", "--model-opt", "dropout=0",
          "--epochs", "2", "--batch-size", "64", "--lr", "0.05", "--seed", "2", "--no-progress",
          "--schedule", "cosine", "--momentum", "0.0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int = 1) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "bastion.cli", "-q", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "bastion.cli", "-q", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(run / "model")
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "single"
    p = _run([*COMMON, "--model-opt", "delay=0", "--out", str(out)])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    return out


def test_two_processes_match_one(single, tmp_path):
    out = tmp_path / "ddp"
    p = _run([*COMMON, "--model-opt", "delay=0", "--out", str(out)], nproc=2)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    a, b = _weights(single), _weights(out)
    assert a.keys() == b.keys()
    for k in a:  # equal up to the floating-point order of the gradient reduction
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # written once, by rank 0
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    ref = json.loads((single / "report.json").read_text())
    assert abs(report["final"]["test_acc"] - ref["final"]["test_acc"]) < 0.01


def test_resume_across_world_sizes(single, tmp_path):
    """Killed while running with 2 processes, resumed with 1: ends where one process would."""
    out = tmp_path / "run"
    p = _run([*COMMON, "--out", str(out), "--checkpoint-every", "4"], nproc=2)
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and p.poll() is None:
        for j in (out / "checkpoints").glob("ckpt-*.json") if (out / "checkpoints").exists() else []:
            try:
                st = json.loads(j.read_text())["state"]
            except (json.JSONDecodeError, OSError):
                continue
            if st["epoch"] >= 1 and st["batch"] > 0:
                os.killpg(p.pid, signal.SIGKILL)
                killed = True
                break
        if killed:
            break
        time.sleep(0.01)
    p.wait(timeout=60)
    assert killed, "the 2-process run finished before it could be interrupted"
    q = _run([*COMMON, "--out", str(out), "--checkpoint-every", "4", "--resume"])
    assert q.wait(timeout=300) == 0, q.stderr.read()
    a, b = _weights(single), _weights(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


def _eval_worker(out: Path, nproc: int, state: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    script = [str(TESTS / "dist_eval_worker.py"), str(out), *([str(state)] if state else [])]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *script]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sharded_evaluate_equals_single_process(tmp_path):
    """2 gloo processes split the batches; the gathered report has exactly the one-process results."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    p = _eval_worker(one, 1)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    q = _eval_worker(two, 2, tmp_path / "state.jsonl")
    assert q.wait(timeout=300) == 0, q.stderr.read()
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["n"] == b["n"] == 90
    assert a["per_example"] == b["per_example"]  # every example's outcome, attack by attack
    assert a["robust_accuracy"] == b["robust_accuracy"] and a["clean_accuracy"] == b["clean_accuracy"]
    assert 0.0 < a["clean_accuracy"]  # the comparison is not between two empty reports
    assert any("sharded over 2 processes" in s for s in b["notes"])
    # each rank kept its own state file with its own batches (6 batches of 16: 3 each)
    for r in range(2):
        lines = (tmp_path / f"state.jsonl.rank{r}-of-2").read_text().splitlines()
        assert len(lines) == 1 + 3  # header + 3 batch records


def test_cli_evaluate_under_torchrun_writes_once(tmp_path):
    """`bastion evaluate` under 2 processes: one report, equal to the single-process CLI run."""
    model = tmp_path / "model"
    p = _run([*COMMON[:COMMON.index("--epochs")], "--epochs", "1", "--batch-size", "64", "--seed", "2",
              "--no-progress", "--model-opt", "delay=0", "--out", str(model)])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    args = ["evaluate", "--model-path", str(model), "--data", "digits", "--threat", "linf:0.1", "--attack", "fgsm",
            "--attack", "pgd", "--attack-opt", "pgd:steps=3", "--limit", "100", "--batch-size", "16", "--grid", "0", "--no-progress",
            "--channels-last"]
    one = _run([*args, "--out", str(tmp_path / "one")])
    assert one.wait(timeout=300) == 0, one.stderr.read()
    two = _run([*args, "--out", str(tmp_path / "two")], nproc=2)
    assert two.wait(timeout=300) == 0, two.stderr.read()
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert a["per_example"] == b["per_example"] and a["n"] == b["n"] == 100
    assert json.loads((tmp_path / "two" / "config.json").read_text())["evaluation"]["processes"] == 2
    assert sorted(f.name for f in (tmp_path / "two").iterdir() if f.name.startswith("state")) == \
        ["state.jsonl.rank0-of-2", "state.jsonl.rank1-of-2"]


def _audit_outcomes(path: Path) -> dict:
    """What an audit found, per attack run and per check, without the times."""
    r = json.loads(path.read_text())
    runs = [{k: v for k, v in run.items() if "time" not in k} for run in r["attacks"]]
    checks = r["checks"]
    return {"verdict": r["verdict"], "runs": runs, "checks": checks, "clean": r["clean_accuracy"]}


def test_cli_audit_under_torchrun_equals_one_process(tmp_path):
    """`bastion audit` under 2 processes: one report (rank 0 writes) with the one-process results."""
    model = tmp_path / "model"
    p = _run([*COMMON[:COMMON.index("--epochs")], "--epochs", "1", "--batch-size", "64", "--seed", "2",
              "--no-progress", "--model-opt", "delay=0", "--out", str(model)])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    args = ["audit", "--model", str(model), "--data", "digits", "--threat", "linf:0.2", "--transform",
            "bit-depth:bits=2", "--examples", "48", "--batch-size", "16", "--no-progress"]
    one = _run([*args, "--out", str(tmp_path / "one")])
    assert one.wait(timeout=600) == 0, one.stderr.read()
    two = _run([*args, "--out", str(tmp_path / "two")], nproc=2)
    out, err = two.communicate(timeout=600)
    assert two.returncode == 0, err
    a, b = _audit_outcomes(tmp_path / "one" / "report.json"), _audit_outcomes(tmp_path / "two" / "report.json")
    assert a == b
    assert len(a["runs"]) >= 4 and 0.0 < a["clean"]  # a real audit, not two empty ones
    assert json.loads((tmp_path / "two" / "report.json").read_text())["config"]["processes"] == 2
    assert out.count("wrote ") == 1  # only rank 0 printed and wrote


def test_shutdown_leaves_the_process_group(tmp_path):
    """`bastion.distributed.shutdown` destroys an initialized group (a gloo group left to the
    interpreter's exit could abort the process after its work was done) and is a no-op outside one."""
    import torch.distributed as dist

    from bastion import distributed as D

    D.shutdown()  # no group: nothing to do, no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    D.shutdown()
    assert not dist.is_initialized()
    assert D.world() == (0, 1)


def test_cli_main_keeps_a_callers_process_group(tmp_path):
    """`bastion.cli.main` tears down only the group its command joined: a caller's own group survives it."""
    import torch.distributed as dist

    from bastion.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["-q", "list"]) == 0
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
