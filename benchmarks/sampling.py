"""Times the project's sampler against the naive per-position `model.predict` loop (as in the Keras PixelCNN
example), on the same prior weights, grid and batch, in the same run, and prints the ratio.

    python -m benchmarks.sampling                      # a prior of the demo preset's shape, random weights
    python -m benchmarks.sampling --run runs/NAME      # the trained prior of a run

The naive loop is timed on the first --naive-rows rows and extrapolated to the whole grid (its cost per position
does not depend on the position: every call runs the full model). The last line is JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import json
import platform
import sys
import time

import keras
import numpy as np
import tensorflow_probability as tfp

import modules
import predict
import run_state


def model_inputs(prior, codes, condition=None):
    """What the prior's call takes for these codes: with the condition, and for a two-level prior a fixed (blank)
    layout (the naive loop times the code positions; each layout cell would cost the same)."""
    return prior.pack_inputs(codes, condition, np.zeros((len(codes), *prior.layout_shape), "int32"))


def naive_loop(prior, batch: int, rows: int, seed: int, condition=None) -> tuple[np.ndarray, int]:
    """The Keras example's sampler: one model.predict over the whole grid per position. Returns the codes
    and how many positions were sampled."""
    height, width = prior.grid_shape
    codes = np.zeros((batch, height, width), "int32")
    for i in range(rows):
        for j in range(width):
            logits = prior.predict(model_inputs(prior, codes, condition), verbose=0)
            logits = (logits["codes"] if prior.layout_levels else logits)[:, i, j]
            codes[:, i, j] = tfp.distributions.Categorical(logits=logits).sample(seed=seed).numpy()
    return codes, rows * width


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run folder with a prior.keras (default: random weights, demo shape)")
    parser.add_argument("--batch", type=int, default=16, help="samples generated at once (default 16)")
    parser.add_argument("--naive-rows", type=int, default=2, help="rows of the grid the naive loop is timed on")
    args = parser.parse_args(argv)

    if args.run:
        prior = run_state.Run.open(args.run).stage("prior").load_model(float32=True)
        source = args.run
    else:
        config = run_state.Config(**run_state.DEMO_PRESET)
        keras.utils.set_random_seed(0)
        prior = modules.new_prior(config, steps_per_epoch=1)
        source = "demo preset shape, random weights"
    height, width = prior.grid_shape
    print(f"prior: {source}; grid {height}x{width}, batch {args.batch}, {prior.count_params():,} parameters")

    positions = np.linspace(0, 1, args.batch, dtype="float32")  # depths, for a depth-conditioned prior
    condition = None
    if prior.num_conditions:
        condition = np.asarray(modules.slice_position_features(positions, prior.num_conditions // 2))
    sampler = predict.make_sampler(prior, temperature=1.0, seed=0)
    start = time.perf_counter()
    sampler(args.batch, positions)
    first_s = time.perf_counter() - start  # tracing + the first run
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        sampler(args.batch, positions)
        runs.append(time.perf_counter() - start)
    sampler_s = min(runs)
    print(f"project sampler: {sampler_s:.2f} s per batch (best of 3), first call with tracing {first_s:.2f} s")

    zeros = np.zeros((args.batch, height, width), "int32")
    prior.predict(model_inputs(prior, zeros, condition), verbose=0)  # build predict's function once
    start = time.perf_counter()
    _, sampled = naive_loop(prior, args.batch, min(args.naive_rows, height), seed=0, condition=condition)
    timed = time.perf_counter() - start
    positions_per_sample = height * width + (int(np.prod(prior.layout_shape)) if prior.layout_levels else 0)
    naive_s = timed / sampled * positions_per_sample
    extrapolated = sampled < height * width
    print(f"naive model.predict loop: {timed:.1f} s for {sampled} positions -> {naive_s:.0f} s for the grid"
          f"{' (extrapolated)' if extrapolated else ''}")
    speedup = naive_s / sampler_s
    print(f"speedup: {speedup:.0f}x (with the sampler's first-call tracing counted: {naive_s / first_s:.0f}x)")
    print(json.dumps({"benchmark": "sampling", "grid": [height, width], "batch": args.batch,
                      "sampler_s": round(sampler_s, 3), "sampler_first_call_s": round(first_s, 3),
                      "naive_s": round(naive_s, 1), "naive_positions_timed": sampled,
                      "naive_extrapolated": extrapolated, "speedup": round(speedup, 1),
                      "speedup_with_tracing": round(naive_s / first_s, 1),
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "source": source}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
