"""The models of modules.py under Keras 3 with JAX: training steps of the VQ-VAE and the prior at the OASIS preset,
and the sampler, timed on random arrays. Made for a GPU machine where TensorFlow is not installed.

    KERAS_BACKEND=jax python -m benchmarks.jax_train_step                 # OASIS preset, batch 128 and 32
    KERAS_BACKEND=jax python -m benchmarks.jax_train_step --dtype mixed_bfloat16

Prints images/s and code grids/s with the estimated seconds per OASIS epoch (9,664 training slices), and the
seconds to sample 16 code grids of 64x64. Shapes are what matter for speed, so the inputs are random: smooth
random images in [0, 1] and uniform random code grids. The last line is JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

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

OASIS_TRAIN_SLICES = 9664


def time_fit(model, x, y, steps: int, rounds: int) -> tuple[float, float]:
    """(seconds of the first step, compilation included; best seconds per step over `rounds` rounds)."""
    batch = len(keras.tree.flatten(y)[0])
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(rounds):
        repeat = lambda a: np.concatenate([a] * steps)  # noqa: E731
        xs, ys = keras.tree.map_structure(repeat, x), keras.tree.map_structure(repeat, y)
        start = time.perf_counter()
        model.fit(xs, ys, batch_size=batch, epochs=1, verbose=0, shuffle=False)
        best = min(best, (time.perf_counter() - start) / steps)
    return first, best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="VQ-VAE batch (default 128, the OASIS preset's)")
    parser.add_argument("--prior-batch", type=int, default=32, help="prior batch (default 32, the preset's)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed round (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, the best counts (default 3)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "mixed_bfloat16", "mixed_float16"))
    parser.add_argument("--samples", type=int, default=16, help="code grids sampled at once (0: skip)")
    parser.add_argument("--demo", action="store_true", help="the demo preset's shapes instead (a quick CPU check)")
    args = parser.parse_args(argv)
    config = run_state.Config(**run_state.DEMO_PRESET) if args.demo else run_state.Config()
    config = dataclasses.replace(config, batch_size=args.batch, prior_batch_size=args.prior_batch)
    import jax

    devices = ", ".join(str(d) for d in jax.devices())
    print(f"Keras {keras.__version__} on {keras.backend.backend()} {jax.__version__}: {devices}; {args.dtype}")

    rng = np.random.default_rng(0)
    size, grid = config.image_size, config.grid_size
    coarse = rng.random((args.batch, size // 16, size // 16, 1)).astype("float32")
    images = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)  # (B, size, size, 1) blocky images in [0, 1]
    vqvae = modules.new_vqvae(config, steps_per_epoch=100, dtype=args.dtype, jit_compile=True)
    first, step = time_fit(vqvae, images, images, args.steps, args.rounds)
    vqvae_rate = args.batch / step
    print(f"VQ-VAE ({vqvae.count_params():,} parameters, {size} px, batch {args.batch}): first step {first:.1f} s, "
          f"then {vqvae_rate:,.0f} images/s -> {OASIS_TRAIN_SLICES / vqvae_rate:.1f} s per OASIS epoch")

    codes = rng.integers(0, config.num_embeddings, (args.prior_batch, grid, grid)).astype("int32")
    condition = None  # the depth-conditioned prior (the default) takes each slice's depth features too
    if config.prior_position_frequencies:
        condition = np.asarray(modules.slice_position_features(np.linspace(0, 1, args.prior_batch, dtype="float32"),
                                                               config.prior_position_frequencies))
    prior = modules.new_prior(config, steps_per_epoch=100, dtype=args.dtype, jit_compile=True)
    layouts = None  # a two-level prior: the layout grid is an input and a target too
    if prior.layout_levels:
        layouts = rng.integers(0, prior.layout_levels, (args.prior_batch, *prior.layout_shape)).astype("int32")
    first, step = time_fit(prior, prior.pack_inputs(codes, condition, layouts), prior.pack_targets(codes, layouts),
                           args.steps, args.rounds)
    prior_rate = args.prior_batch / step
    print(f"prior ({prior.count_params():,} parameters, {grid}x{grid} grid, batch {args.prior_batch}): first step "
          f"{first:.1f} s, then {prior_rate:,.0f} grids/s -> {OASIS_TRAIN_SLICES / prior_rate:.1f} s per OASIS epoch")

    result = {"benchmark": "jax_train_step", "backend": keras.backend.backend(), "devices": devices,
              "dtype": args.dtype, "image_size": size, "batch": args.batch, "prior_batch": args.prior_batch,
              "vqvae_images_per_s": round(vqvae_rate, 1),
              "vqvae_s_per_oasis_epoch": round(OASIS_TRAIN_SLICES / vqvae_rate, 1),
              "prior_grids_per_s": round(prior_rate, 1),
              "prior_s_per_oasis_epoch": round(OASIS_TRAIN_SLICES / prior_rate, 1)}
    if args.samples:
        sampler_prior = modules.full_precision(prior)  # sampling runs in float32
        grid_condition = None if condition is None else np.resize(condition, (args.samples, condition.shape[1]))

        @jax.jit
        def sample(key):
            def draw(logits, position):
                return jax.random.categorical(jax.random.fold_in(key, position), logits)

            return sampler_prior.sample(args.samples, draw, grid_condition)

        # the trace reads the Keras variables once: the weights enter the compiled sampler as constants
        start = time.perf_counter()
        grids = np.asarray(sample(jax.random.key(0)))
        first = time.perf_counter() - start
        start = time.perf_counter()
        grids = np.asarray(sample(jax.random.key(1)))
        seconds = time.perf_counter() - start
        assert grids.shape == (args.samples, grid, grid)
        # correctness on this backend: a greedy sample is a fixed point of the full model's argmax
        argmax = lambda logits, position: keras.ops.argmax(logits, axis=-1)  # noqa: E731
        greedy = np.asarray(jax.jit(lambda: sampler_prior.sample(args.samples, argmax, grid_condition))())
        greedy_layout = None
        if prior.layout_levels:  # the greedy layout the sampler drew first, and the codes' logits given it
            greedy_layout = np.asarray(jax.jit(lambda: sampler_prior.layout_prior.sample(
                args.samples, argmax, grid_condition))())
        logits = sampler_prior(sampler_prior.pack_inputs(greedy, grid_condition, greedy_layout))
        logits = logits["codes"] if prior.layout_levels else logits
        agree = float(np.mean(np.asarray(keras.ops.argmax(logits, axis=-1)) == greedy))
        print(f"greedy sample vs the full model's argmax: {agree:.2%} of positions agree (must be 100%)")
        result["sampler_matches_full_model"] = agree == 1.0
        print(f"sampler: {args.samples} grids of {grid}x{grid} in {seconds:.2f} s ({first:.1f} s on the first call, "
              "compilation included)")
        result.update(sample_seconds=round(seconds, 3), sample_first_call_seconds=round(first, 2),
                      samples=args.samples)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
