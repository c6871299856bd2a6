"""Which learning rate and batch size should the OASIS preset use? Trains the OASIS-preset VQ-VAE at 256 px with
each candidate for the same wall-clock budget on the same slices, each with a cosine schedule over the steps that
fit, and ranks them by held-out SSIM beside the bilinear x4 floor of the same slices.

    python -m benchmarks.oasis_preset                         # the demo set at 256 px, 300 s per candidate (CPU)
    KERAS_BACKEND=jax python -m benchmarks.oasis_preset --budget 600 --train-slices 9600 --data-dir PATH

On a CPU this ranks candidates after a few thousand images, not after the 30 epochs of a GPU run: a relative
ranking on the same images, as a guide. The last line is JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import keras
import numpy as np

import dataset
import modules
import run_state
import train
import utils
from benchmarks.deadline import StopAt

CANDIDATES = [  # (batch, learning rate)
    (128, 2e-4), (128, 1e-3), (32, 2e-4), (32, 1e-3), (32, 2e-3),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=run_state.DEMO_PRESET["data_dir"], help="data (default: the demo set)")
    parser.add_argument("--budget", type=float, default=300, help="seconds of training per candidate (300)")
    parser.add_argument("--train-slices", type=int, default=768, help="training slices used (768)")
    parser.add_argument("--held-out", type=int, default=96, help="validation slices scored (96)")
    args = parser.parse_args(argv)
    if not Path(args.data_dir).exists():
        dataset.make_demo(args.data_dir)
    rng = np.random.default_rng(0)
    files = dataset.split_files(args.data_dir, "train")
    picked = sorted(rng.choice(files, min(args.train_slices, len(files)), replace=False))
    train_images = dataset.load_images(picked, 256)
    val_files = dataset.split_files(args.data_dir, "validate")
    val_images = dataset.load_images(sorted(rng.choice(val_files, min(args.held_out, len(val_files)), replace=False)),
                                     256)
    floor = float(np.mean(utils.ssim(val_images, utils.bilinear_baseline(val_images, 4))))
    print(f"{len(train_images)} training and {len(val_images)} held-out slices at 256 px from {args.data_dir}; "
          f"bilinear x4 floor {floor:.4f}; {args.budget:.0f} s per candidate")
    results = []
    for batch, learning_rate in CANDIDATES:
        config = dataclasses.replace(run_state.Config(), batch_size=batch, learning_rate=learning_rate)
        steps_per_epoch = math.ceil(len(train_images) / batch)
        probe = modules.new_vqvae(config, steps_per_epoch)
        probe.fit(train_images[:batch], train_images[:batch], batch_size=batch, verbose=0)  # compile
        start = time.perf_counter()
        probe.fit(train_images[:batch * 2], train_images[:batch * 2], batch_size=batch, verbose=0)
        step = (time.perf_counter() - start) / 2
        began = time.time()
        steps = max(int(args.budget / step * 0.95), 1)
        model = modules.new_vqvae(dataclasses.replace(config, epochs=max(1, round(steps / steps_per_epoch))),
                                  steps_per_epoch)
        stop = StopAt(began + args.budget)
        model.fit(train_images, train_images, batch_size=batch, epochs=10_000, verbose=0, shuffle=True,
                  callbacks=[train.RestartUnusedCodes(train_images[:128], config.seed), stop])
        ssim = float(np.mean(utils.ssim(val_images, utils.reconstruct(model, val_images)[0])))
        results.append({"batch": batch, "learning_rate": learning_rate, "steps": stop.steps,
                        "images_seen": stop.steps * batch, "held_out_ssim": round(ssim, 4)})
        print(f"batch {batch:>3}, learning rate {learning_rate:g}: {stop.steps} steps ({stop.steps * batch} images), "
              f"held-out SSIM {ssim:.4f} (floor {floor:.4f})")
    best = max(results, key=lambda r: r["held_out_ssim"])
    print(f"best: batch {best['batch']}, learning rate {best['learning_rate']:g}")
    print(json.dumps({"benchmark": "oasis_preset", "backend": keras.backend.backend(), "budget_s": args.budget,
                      "train_slices": len(train_images), "bilinear_floor_ssim": round(floor, 4),
                      "results": results, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
