"""Is the input pipeline ever the bottleneck? Times, in one run, the tf.data pipeline alone (decode + resize +
scale, on its first pass and from its cache) and the VQ-VAE's training step, in images per second; with --epochs,
whole epochs of model.fit over the pipeline as train.py runs them, against the same pipeline with tf.data's
autotuner on (what train.py used before): seconds per epoch, and how long each epoch waited for its first batch.

    python -m benchmarks.input_pipeline                 # the demo preset on the demo set (built if missing)
    python -m benchmarks.input_pipeline --epochs 4      # + 4 epochs with each pipeline (about 3 minutes here)
    python -m benchmarks.input_pipeline --oasis --data-dir PATH/TO/OASIS

The last line is JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

import keras
import tensorflow as tf

import dataset
import modules
import run_state


class FirstBatchWait(keras.callbacks.Callback):
    """Seconds from each epoch's start to its first training step: the time Keras's new iterator takes."""

    def __init__(self):
        super().__init__()
        self.waits, self.epoch_seconds = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self.waits.append(time.perf_counter() - self.start)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self.start)


def whole_epochs(config, pipelines: dict, epochs: int) -> dict:
    """Per pipeline, a fresh VQ-VAE fit for 1 + epochs epochs (the first traces, and is not counted): mean seconds
    per epoch and mean wait for the first batch (the autotuner's waits came every other epoch or so: means, not
    medians)."""
    results = {}
    for name, pipeline in pipelines.items():
        model = modules.new_vqvae(config, steps_per_epoch=1)
        timer = FirstBatchWait()
        model.fit(pipeline, epochs=1 + epochs, verbose=0, shuffle=False, callbacks=[timer])
        results[name] = {"epoch_s": float(np.mean(timer.epoch_seconds[1:])),
                         "first_batch_wait_s": float(np.mean(timer.waits[1:]))}
        print(f"{name}: {results[name]['epoch_s']:.1f} s per epoch, of which "
              f"{results[name]['first_batch_wait_s']:.1f} s waiting for the first batch "
              f"(epochs {', '.join(f'{s:.1f}' for s in timer.epoch_seconds[1:])} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--oasis", action="store_true", help="the OASIS preset (256 px, batch 128) instead of the demo")
    parser.add_argument("--data-dir", help="data (default: the preset's)")
    parser.add_argument("--train-batches", type=int, default=20, help="training steps per round (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of training steps, the best counts")
    parser.add_argument("--epochs", type=int, default=0,
                        help="also time this many whole epochs with each pipeline (default 0: skip)")
    args = parser.parse_args(argv)
    config = run_state.Config() if args.oasis else run_state.Config(**run_state.DEMO_PRESET)
    if args.data_dir:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    if not args.oasis and not Path(config.data_dir).exists():
        dataset.make_demo(config.data_dir)
    files = dataset.split_files(config.data_dir, "train")
    print(f"{len(files)} training slices from {config.data_dir} at {config.image_size} px, "
          f"batch {config.batch_size}")

    start = time.perf_counter()
    pipeline = dataset.make_dataset(files, config.image_size, config.batch_size, shuffle=True, seed=0)
    first_s = time.perf_counter() - start  # list + decode + resize + scale + fill the cache, in parallel
    start = time.perf_counter()
    for _ in pipeline:
        pass
    cached_s = time.perf_counter() - start  # from the cache: shuffle + batch
    first, cached = len(files) / first_s, len(files) / cached_s
    print(f"pipeline, first pass (decode): {first:,.0f} images/s; from the cache: {cached:,.0f} images/s")

    model = modules.new_vqvae(config, steps_per_epoch=len(files) // config.batch_size)
    model.fit(pipeline.take(2), verbose=0, shuffle=False)  # build and compile the training step first
    batches = min(args.train_batches, len(files) // config.batch_size)
    step = 0.0
    for _ in range(args.rounds):  # the best round: the fastest the model consumes, the hardest case for the input
        start = time.perf_counter()
        model.fit(pipeline.take(batches), verbose=0, shuffle=False)
        step = max(step, batches * config.batch_size / (time.perf_counter() - start))
    print(f"VQ-VAE training step: {step:,.0f} images/s -> the first-pass pipeline is {first / step:.0f}x and the "
          f"cached one {cached / step:.0f}x faster than training consumes")
    figures = {}
    if args.epochs:
        autotuned = tf.data.Options()
        autotuned.autotune.enabled = True
        epochs = whole_epochs(config, {"project pipeline (autotuner off)": pipeline,
                                       "baseline: autotuner on": pipeline.with_options(autotuned)}, args.epochs)
        (ours, baseline) = epochs.values()
        print(f"-> whole epochs {baseline['epoch_s'] / ours['epoch_s']:.2f}x faster without the autotuner")
        figures = {"epoch_s": round(ours["epoch_s"], 2), "first_batch_wait_s": round(ours["first_batch_wait_s"], 2),
                   "baseline_autotuned_epoch_s": round(baseline["epoch_s"], 2),
                   "baseline_first_batch_wait_s": round(baseline["first_batch_wait_s"], 2),
                   "epoch_speedup": round(baseline["epoch_s"] / ours["epoch_s"], 2)}
    print(json.dumps({"benchmark": "input_pipeline", "preset": "oasis" if args.oasis else "demo",
                      "image_size": config.image_size, "batch": config.batch_size, "images": len(files),
                      "pipeline_first_epoch_images_per_s": round(first, 1),
                      "pipeline_cached_images_per_s": round(cached, 1), "train_step_images_per_s": round(step, 1),
                      "first_epoch_ratio": round(first / step, 1), "cached_ratio": round(cached / step, 1),
                      **figures,
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
