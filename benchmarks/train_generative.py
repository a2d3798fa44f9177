"""Train the generative models behind Bastion's purifiers and save them under one folder.

    python benchmarks/train_generative.py --data mnist-5k --out runs/generative/mnist-5k
    python benchmarks/train_generative.py --data fashion-mnist --max-examples 10000 --out runs/generative/fmnist

writes, in ``--out``::

    pixelcnn.safetensors / .json       for  pixeldefend:model=<out>/pixelcnn
    generator.safetensors / .json      for  defense-gan:model=<out>/generator
    autoencoder.safetensors / .json    for  magnet:model=<out>/autoencoder
    config.json                        the resolved command-line options
    report.json                        seconds and held-out numbers per model

Held-out numbers (on the first ``--eval-examples`` images of the test split): the PixelCNN's
negative log-likelihood in bits per sub-pixel (of its `levels` quantization), Defense-GAN's
mean squared reconstruction error of clean test images, the autoencoder's reconstruction error
of clean and of noisy test images. Everything is seeded by ``--seed``: the same command gives
the same weights on the same machine.

The defaults fit a few minutes per model on two CPU cores for mnist-5k (4,000 training
images); they are small models trained briefly, not the papers' full-size ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bastion.checkpoint import atomic_write_json
from bastion.data import load_dataset
from bastion.defenses.generative import defensegan_project, train_autoencoder, train_gan, train_pixelcnn

MODELS = ("pixelcnn", "gan", "autoencoder")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="mnist-5k", help="dataset name (bastion list datasets)")
    p.add_argument("--out", type=Path, required=True, help="folder for the checkpoints and the report")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-examples", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--eval-examples", type=int, default=200, help="test images for the held-out numbers")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    g = p.add_argument_group("PixelCNN (PixelDefend)")
    g.add_argument("--pixelcnn-epochs", type=int, default=3)
    g.add_argument("--levels", type=int, default=256, help="quantization levels (256 = 8 bits; fewer is faster)")
    g.add_argument("--pixelcnn-hidden", type=int, default=32)
    g.add_argument("--pixelcnn-blocks", type=int, default=4)
    g.add_argument("--pixelcnn-lr", type=float, default=3e-3)
    g = p.add_argument_group("GAN (Defense-GAN)")
    g.add_argument("--gan-epochs", type=int, default=10)
    g.add_argument("--latent-dim", type=int, default=32, help="the paper: 128 on MNIST")
    g.add_argument("--gan-width", type=int, default=32)
    g.add_argument("--gan-batch-size", type=int, default=32)
    g.add_argument("--gan-lr", type=float, default=1e-3)
    g.add_argument("--defensegan-examples", type=int, default=20,
                   help="test images projected (L=10, R=200) for the report")
    g = p.add_argument_group("denoising autoencoder (MagNet)")
    g.add_argument("--ae-epochs", type=int, default=30)
    g.add_argument("--ae-structure", default='[3, "average", 3]', help="JSON list: filters and 'average'/'max'")
    g.add_argument("--ae-noise", type=float, default=0.1)
    g.add_argument("--ae-lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    args.ae_structure = json.loads(args.ae_structure)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    train = load_dataset(args.data, "train")
    if args.max_examples is not None:
        train = train.take(args.max_examples)
    test = load_dataset(args.data, "test").take(args.eval_examples)
    xte = test.images.to(args.device)
    report: dict = {"data": args.data, "train_examples": len(train), "eval_examples": len(test), "models": {}}
    common = dict(seed=args.seed, device=args.device, progress=args.progress)

    if "pixelcnn" in args.models:
        t0 = time.perf_counter()
        m = train_pixelcnn(train, args.pixelcnn_epochs, levels=args.levels, hidden=args.pixelcnn_hidden,
                           blocks=args.pixelcnn_blocks, lr=args.pixelcnn_lr, save_to=out / "pixelcnn", **common)
        with torch.no_grad():
            nll = torch.cat([m.nll(xte[i:i + 100]) for i in range(0, len(xte), 100)]).mean().item()
        report["models"]["pixelcnn"] = {"checkpoint": str(out / "pixelcnn"), "seconds": round(time.perf_counter() - t0, 1),
                                        "train_bits_per_dim": m.training_info["train_bits_per_dim"],
                                        "test_bits_per_dim": round(nll, 4), "levels": args.levels}
        _log(report["models"]["pixelcnn"], "pixelcnn")

    if "gan" in args.models:
        t0 = time.perf_counter()
        g = train_gan(train, args.gan_epochs, latent_dim=args.latent_dim, width=args.gan_width,
                      batch_size=args.gan_batch_size, lr=args.gan_lr,
                      save_to=out / "generator", **common)
        secs = time.perf_counter() - t0
        n = min(len(xte), args.defensegan_examples)
        rng = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        _, _, err = defensegan_project(g, xte[:n], restarts=10, steps=200, rng=rng)
        report["models"]["gan"] = {"checkpoint": str(out / "generator"), "seconds": round(secs, 1),
                                   "history": g.training_info["history"][-1:],
                                   "defensegan_test_mse_L10_R200": round(err.mean().item(), 5),
                                   "defensegan_seconds_per_image": round((time.perf_counter() - t0) / n, 3)}
        _log(report["models"]["gan"], "gan")

    if "autoencoder" in args.models:
        t0 = time.perf_counter()
        ae = train_autoencoder(train, args.ae_epochs, structure=args.ae_structure, noise=args.ae_noise,
                               lr=args.ae_lr, save_to=out / "autoencoder", **common)
        gen = torch.Generator().manual_seed(args.seed)
        noisy = (xte + 0.2 * torch.randn(xte.shape, generator=gen).to(xte.device)).clamp(0, 1)
        with torch.no_grad():
            clean_err = ae.reconstruction_error(xte).mean().item()
            noisy_err = ae.reconstruction_error(noisy).mean().item()
        report["models"]["autoencoder"] = {"checkpoint": str(out / "autoencoder"),
                                           "seconds": round(time.perf_counter() - t0, 1),
                                           "train_mse": ae.training_info["train_mse"][-1],
                                           "test_l1_error_clean": round(clean_err, 5),
                                           "test_l1_error_noisy_0.2": round(noisy_err, 5)}
        _log(report["models"]["autoencoder"], "autoencoder")

    atomic_write_json(out / "report.json", report)
    print(f"wrote {out / 'report.json'}")
    return 0


def _log(entry: dict, name: str) -> None:
    print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in entry.items() if k != "checkpoint"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
