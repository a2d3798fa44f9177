"""Run `evaluate` in each process of a torchrun job (or alone) and write rank 0's report.

Used by tests/test_distributed.py: ``python -m torch.distributed.run --nproc_per_node=2
tests/dist_eval_worker.py OUT`` must write the same per-example results as the script run alone.
"""

from __future__ import annotations

import sys

import torch

from bastion import distributed as D
from bastion.data import load_dataset
from bastion.evaluation import evaluate
from slow_factory import build


def main(out: str, state_file: str | None = None) -> None:
    torch.set_num_threads(1)
    rank, world = D.init_from_env()
    torch.manual_seed(0)  # the same random weights on every rank
    model = build(10, (1, 8, 8), delay=0.0, dropout=0.0)
    data = load_dataset("digits", "test").take(90)
    suite = [("pgd", {"steps": 5}), ("square", {"n_queries": 30})]
    report = evaluate(model, data, "linf:0.1", attacks=suite, batch_size=16, seed=3, progress=False,
                      state_file=state_file)
    if rank == 0:
        report.save(out)
    D.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
