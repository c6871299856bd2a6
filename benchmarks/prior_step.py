"""The prior's training step, where train.py --demo spends most of its time: milliseconds per step of the demo
preset's prior (or the OASIS preset's) with one level or two, in float32 or mixed bfloat16, at the preset's width
and depth or others, interleaved in rounds so that load from other processes hits all variants alike; the best
round counts. Inputs are random code grids, conditions and layouts of the preset's shapes (the step's cost does
not depend on their values).

    python -m benchmarks.prior_step                                  # demo preset: 1 and 2 levels x float32, bf16
    python -m benchmarks.prior_step --levels 8 --dtypes float32      # one variant
    python -m benchmarks.prior_step --levels 8 --dtypes float32 --sizes 32x6 48x10   # this preset and the last
    KERAS_BACKEND=jax python -m benchmarks.prior_step --oasis --batch 32

Ratios are to the first variant (the first size, the preset's levels, float32). The last line is JSON.
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

import keras
import numpy as np

import modules
import run_state


def random_batch(prior, batch: int, seed: int = 0) -> tuple:
    """(inputs, targets) of one training step of `prior`: random codes, conditions and layouts."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, prior.num_embeddings, (batch, *prior.grid_shape)).astype("int32")
    condition = rng.normal(size=(batch, prior.num_conditions)).astype("float32")
    layout = (rng.integers(0, prior.layout_levels, (batch, *prior.layout_shape)).astype("int32")
              if prior.layout_levels else None)
    return prior.pack_inputs(codes, condition, layout), prior.pack_targets(codes, layout)


def parse_size(size: str, parser: argparse.ArgumentParser) -> tuple[int, int]:
    """'32x6' -> (32 channels, 6 gated layers)."""
    try:
        channels, layers = (int(part) for part in size.lower().split("x"))
    except ValueError:
        parser.error(f"--sizes takes CHANNELSxLAYERS such as 32x6, got {size!r}")
    if channels <= 0 or layers <= 0:
        parser.error(f"--sizes takes positive channels and layers, got {size!r}")
    return channels, layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--oasis", action="store_true", help="the OASIS preset's prior instead of the demo's")
    parser.add_argument("--levels", type=int, nargs="+", help="prior_layout_levels to time (default: the preset's, "
                                                              "then 0 if it has two levels)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "mixed_bfloat16"],
                        choices=("float32", "mixed_bfloat16", "mixed_float16"))
    parser.add_argument("--sizes", nargs="+", metavar="CxL", help="prior widths x depths (gated layers) to time, "
                                                                   "e.g. 32x6 48x10 (default: the preset's)")
    parser.add_argument("--batch", type=int, help="grids per step (default: the preset's)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, the best counts (default 3)")
    args = parser.parse_args(argv)
    config = run_state.Config() if args.oasis else run_state.Config(**run_state.DEMO_PRESET)
    batch = args.batch or config.prior_batch_size
    levels = args.levels or [config.prior_layout_levels] + [0] * bool(config.prior_layout_levels)
    sizes = [parse_size(size, parser) for size in args.sizes] if args.sizes else [(config.prior_channels,
                                                                                   config.prior_layers)]
    variants = {}
    for channels, layers in sizes:
        for level in levels:
            for dtype in args.dtypes:
                name = f"{channels}x{layers}, {level} levels, {dtype}"
                prior = modules.new_prior(dataclasses.replace(config, prior_layout_levels=level,
                                                              prior_channels=channels, prior_layers=layers),
                                          1, dtype=dtype)
                inputs, targets = random_batch(prior, batch)
                start = time.perf_counter()
                prior.train_on_batch(inputs, targets)  # traces the step
                print(f"{name}: first step (tracing) {time.perf_counter() - start:.1f} s", flush=True)
                variants[name] = (prior, inputs, targets)
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, (prior, inputs, targets) in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                prior.train_on_batch(inputs, targets)
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps * 1000)
    first = next(iter(best.values()))
    for name, ms in best.items():
        print(f"{name}: {ms:,.0f} ms per step of {batch} grids ({ms / first:.2f}x the first)")
    print(json.dumps({"benchmark": "prior_step", "preset": "oasis" if args.oasis else "demo",
                      "backend": keras.backend.backend(), "batch": batch, "grid": list(prior.grid_shape),
                      "ms_per_step": {name: round(ms, 1) for name, ms in best.items()},
                      "ratio_to_first": {name: round(ms / first, 3) for name, ms in best.items()},
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
