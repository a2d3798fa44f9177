"""Scale and speed options, measured side by side: layouts, compilation, sharding, memory.

    python benchmarks/speed.py --quick                    # smoke run: a few images
    python benchmarks/speed.py --json runs/bench/speed.json
    python benchmarks/speed.py --only layout --compile    # add torch.compile (minutes to compile on a CPU)

Sections (``--only``, comma-separated):

* ``layout``  PGD-20 (no early stop: the same work for everyone) on ``--n`` Fashion-MNIST test
              images against the benchmark ``cnn-small``: the model as trained, converted to
              channels-last (`bastion.speed.channels_last`), and with ``--compile`` compiled by
              `torch.compile`; interleaved rounds, ratios to the default, and the largest
              difference in x_adv (the options reorder arithmetic, nothing else).
* ``shard``   `evaluate(preset="quick")` on ``--n`` images in 1 process (``--threads`` threads) and
              under ``torchrun --nproc_per_node 2`` (threads split between the processes): wall
              time including process start, and whether the per-example results are identical.
* ``memory``  peak resident memory (ru_maxrss) of a fresh process that evaluates 1,000 and then
              ``--mem-n`` (10,000) test images with PGD-20, batch size 256; the data itself
              (N×784 floats) is reported beside it, so what grows with N is visible.

Timings are medians of interleaved rounds (`_common.interleaved`); nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODEL_DIR, fmnist_model, fmnist_test, interleaved, machine_info, set_threads  # noqa: E402

from bastion.attacks import create_attack  # noqa: E402
from bastion.speed import channels_last, compile_model  # noqa: E402

log = logging.getLogger("bastion.bench")
SECTIONS = ("layout", "shard", "memory")
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="test images for layout and shard")
    p.add_argument("--mem-n", type=int, default=10000, help="the large evaluation of the memory section")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="add a torch.compile competitor to the layout section")
    p.add_argument("--only", default=",".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="smoke run: 64 images, 1 round, memory at 256/1024")
    p.add_argument("--json", type=Path, default=None)
    # internal: the worker of the shard and memory sections
    p.add_argument("--worker", choices=("shard", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.only = [s for s in a.only.split(",") if s]
    bad = sorted(set(a.only) - set(SECTIONS))
    if bad:
        p.error(f"--only: unknown {bad}; choose from {', '.join(SECTIONS)}")
    if a.quick:
        a.n, a.mem_n, a.repeats = 64, 1024, 1
    for name in ("n", "mem_n", "threads", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


# --------------------------------------------------------------------------- layout
def section_layout(a: argparse.Namespace) -> dict[str, Any]:
    import copy

    model = fmnist_model().eval().requires_grad_(False)
    data = fmnist_test(a.n)
    x, y = data.images, data.labels
    pgd = create_attack("pgd", steps=20, early_stop=False)
    threat = f"linf:{a.eps!r}"
    models = {"default (NCHW)": model, "channels-last": channels_last(copy.deepcopy(model))}
    compile_s = None
    if a.compile:
        t0 = time.perf_counter()
        cm = compile_model(copy.deepcopy(model))
        pgd(cm, x[:8], y[:8], threat, seed=0)  # compile now (lazy), for grad and no-grad graphs
        compile_s = time.perf_counter() - t0
        models["torch.compile"] = cm
    fns = {name: (lambda m=m: pgd(m, x, y, threat, seed=0).x_adv) for name, m in models.items()}
    t = interleaved(fns, a.repeats)
    ref = t["default (NCHW)"]
    rows = []
    for name, tm in t.items():
        diff = None if tm.result is None or ref.result is None else float((tm.result - ref.result).abs().max())
        rows.append({**tm.to_dict(), "x_default": tm.ratio_to(ref), "max_abs_diff": diff})
    return {"rows": rows, "compile_s": compile_s, "n": a.n}


# --------------------------------------------------------------------------- shard
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_cmd(a: argparse.Namespace, kind: str, out: Path, nproc: int = 1, threads: int | None = None
                ) -> tuple[list[str], dict[str, str]]:
    """The command of a worker and its settings (in the environment: torchrun would take ``--n`` for itself)."""
    settings = {"n": a.n, "mem_n": a.mem_n, "eps": a.eps, "threads": threads or a.threads}
    args = [str(HERE / "speed.py"), "--worker", kind, "--out", str(out)]
    env = {"BASTION_BENCH_WORKER": json.dumps(settings), "OMP_NUM_THREADS": str(threads or a.threads)}
    if nproc == 1:
        return [sys.executable, *args], env
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", *args], env


def _run(cmd_env: tuple[list[str], dict[str, str]]) -> float:
    cmd, extra = cmd_env
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env={**os.environ, **extra}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"worker failed ({p.returncode}): {p.stderr[-2000:]}")
    return time.perf_counter() - t0


def worker_shard(a: argparse.Namespace) -> None:
    from bastion import distributed as D
    from bastion.evaluation import evaluate

    set_threads(a.threads)
    rank, _ = D.init_from_env()
    model = fmnist_model().eval()
    data = fmnist_test(a.n)
    t0 = time.perf_counter()
    report = evaluate(model, data, f"linf:{a.eps!r}", attacks="quick", batch_size=100, seed=0, progress=False)
    if rank == 0:
        a.out.write_text(json.dumps({"eval_s": time.perf_counter() - t0, "per_example": report.per_example,
                                     "robust_accuracy": report.robust_accuracy}))


def section_shard(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    half = max(1, a.threads // 2)
    runs = {"1 process": (1, a.threads), "2 processes (torchrun)": (2, half)}
    results: dict[str, dict[str, Any]] = {}
    fns = {name: (lambda name=name, np_th=np_th: _run(_worker_cmd(a, "shard", tmp / f"{name[0]}.json", *np_th)))
           for name, np_th in runs.items()}
    t = interleaved(fns, a.repeats, warmup=False)
    for name, (nproc, th) in runs.items():
        out = json.loads((tmp / f"{name[0]}.json").read_text())
        results[name] = {**t[name].to_dict(), "processes": nproc, "threads_each": th, "eval_s": out["eval_s"],
                         "robust_accuracy": out["robust_accuracy"], "per_example": out["per_example"],
                         "x_one": t[name].ratio_to(t["1 process"])}
    one, two = results["1 process"], results["2 processes (torchrun)"]
    identical = one.pop("per_example") == two.pop("per_example")
    return {"rows": list(results.values()), "identical_per_example": identical, "n": a.n}


# --------------------------------------------------------------------------- memory
def worker_memory(a: argparse.Namespace) -> None:
    import resource

    from bastion.evaluation import evaluate

    set_threads(a.threads)
    model = fmnist_model().eval()
    data = fmnist_test(a.mem_n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    report = evaluate(model, data, f"linf:{a.eps!r}", attacks=[("pgd", {"steps": 20})], batch_size=256, seed=0,
                      progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    a.out.write_text(json.dumps({"n": a.mem_n, "rss_before_kib": base, "peak_rss_kib": peak,
                                 "data_mib": data.images.numel() * 4 / 2**20, "eval_s": time.perf_counter() - t0,
                                 "robust_accuracy": report.robust_accuracy}))


def section_memory(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rows = []
    for n in sorted({min(1000, a.mem_n), a.mem_n}):
        sub = argparse.Namespace(**{**vars(a), "mem_n": n})
        out = tmp / f"mem{n}.json"
        _run(_worker_cmd(sub, "memory", out))
        rows.append(json.loads(out.read_text()))
    return {"rows": rows}


# --------------------------------------------------------------------------- output
def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = [f"Machine: {m['nproc']} cores ({m['cpu']}), torch {m['torch']}, load average {m['loadavg']}."]
    s = res["sections"]
    if "layout" in s:
        L = s["layout"]
        lines = ["| model | time s (runs) | × default | max abs diff of x_adv |", "|---|---|---|---|"]
        for r in L["rows"]:
            lines.append(f"| {r['name']} | {r['median_s']:.2f} ({r['repeats']}) | {r['x_default']:.2f}× | "
                         f"{r['max_abs_diff']:.1e} |")
        extra = f" Compilation took {L['compile_s']:.0f} s before the first attack." if L["compile_s"] else ""
        out.append(f"### PGD-20 on {L['n']} images: memory layout and compilation\n\n" + "\n".join(lines) + extra)
    if "shard" in s:
        S = s["shard"]
        lines = ["| run | wall s (runs) | evaluate s (rank 0) | × one process | robust acc. |", "|---|---|---|---|---|"]
        for r in S["rows"]:
            lines.append(f"| {r['name']} ({r['threads_each']} thread(s) each) | {r['median_s']:.1f} ({r['repeats']}) | "
                         f"{r['eval_s']:.1f} | {r['x_one']:.2f}× | {100 * r['robust_accuracy']:.1f}% |")
        out.append(f"### Sharded `evaluate(quick)` on {S['n']} images, 1 vs 2 processes\n\n" + "\n".join(lines)
                   + f"\n\nPer-example results identical: {'yes' if S['identical_per_example'] else '**no**'}. "
                   "Wall time includes starting the processes and loading the data.")
    if "memory" in s:
        lines = ["| images | peak RSS MiB | RSS before evaluate MiB | data MiB | evaluate s |", "|---|---|---|---|---|"]
        for r in s["memory"]["rows"]:
            lines.append(f"| {r['n']} | {r['peak_rss_kib'] / 1024:.0f} | {r['rss_before_kib'] / 1024:.0f} | "
                         f"{r['data_mib']:.0f} | {r['eval_s']:.0f} |")
        out.append("### Peak memory of `evaluate` (PGD-20, batch 256)\n\n" + "\n".join(lines))
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.worker:
        for k, v in json.loads(os.environ["BASTION_BENCH_WORKER"]).items():
            setattr(a, k, v)
    if a.worker == "shard":
        worker_shard(a)
        return {}
    if a.worker == "memory":
        worker_memory(a)
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    set_threads(a.threads)
    fmnist_model()  # train the cached model once, before any worker needs it
    import tempfile

    res: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                           "model": str(DEFAULT_MODEL_DIR), "sections": {}}
    with tempfile.TemporaryDirectory() as d:
        for name in a.only:
            log.info("section %s", name)
            t0 = time.perf_counter()
            res["sections"][name] = (section_layout(a) if name == "layout" else
                                     section_shard(a, Path(d)) if name == "shard" else section_memory(a, Path(d)))
            log.info("section %s done in %.0f s", name, time.perf_counter() - t0)
    res["machine"] = machine_info()
    res["markdown"] = markdown(res)
    print(res["markdown"])
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
