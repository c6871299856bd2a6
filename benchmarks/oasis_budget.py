"""The OASIS preset end to end within a time budget, on any Keras backend; made for a GPU machine with JAX and no
TensorFlow. Builds an OASIS-sized demo set in memory (the demo builder, one process per core), trains the
OASIS-preset VQ-VAE with codebook restarts, encodes the slices (and their mirror images), trains the
depth-conditioned two-level prior (layout, then codes) on flipped and shifted grids as train.py's OASIS preset does
(--prior-layout-levels 8, --prior-augment 2), and samples.

    KERAS_BACKEND=jax python -m benchmarks.oasis_budget --budget 1200          # 300/35/17 subjects, as OASIS
    KERAS_BACKEND=jax python -m benchmarks.oasis_budget --budget 240 --subjects 6 2 2 --batch-size 16 --samples 2  # CPU check

The budget counts from the first training step; --vqvae-share of it goes to the VQ-VAE, the rest to the prior.
Each stage first times a few steps, then trains a fresh model whose cosine schedule spans exactly the steps that
fit in its share. Reported, last line as JSON: VQ-VAE images/s and seconds per OASIS epoch (9,664 slices),
held-out SSIM beside the bilinear x4 floor of the same slices, prior grids/s and seconds per epoch, and the seconds
to compile the sampler and to sample --samples grids of 64x64, apart.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import dataclasses
import json
import math
import multiprocessing
import platform
import sys
import time

import keras
import numpy as np

import dataset
import modules
import predict
import run_state
import train  # its callbacks; TensorFlow is imported only by its hardware set-up, not used here
import utils
from benchmarks.deadline import StopAt

OASIS_TRAIN_SLICES = 9664
_TEMPLATE = None


def _build_subject(case: int) -> np.ndarray:
    global _TEMPLATE
    if _TEMPLATE is None:  # once per worker process
        _TEMPLATE = dataset.mni152_template()
    return dataset.demo_subject(*_TEMPLATE, np.random.default_rng([0, case]))[0]  # (32, 256, 256) uint8


def build_set(subjects: tuple[int, int, int], workers: int) -> dict:
    """{split: (slices (N, 256, 256) uint8, depths (N,))}, each subject in one split, as make_demo does."""
    cases = np.cumsum([0, *subjects])
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        volumes = pool.map(_build_subject, range(1, cases[-1] + 1))
    depths = np.linspace(0, 1, dataset.DEMO_SLICES, dtype="float32")
    return {split: (np.concatenate(volumes[cases[i]:cases[i + 1]]), np.tile(depths, subjects[i]))
            for i, split in enumerate(dataset.SPLITS)}


def as_images(slices: np.ndarray) -> np.ndarray:
    return (slices[..., None] / np.float32(255)).astype("float32")


def moved(grids: np.ndarray, offsets: np.ndarray, shift: int, fill: int) -> np.ndarray:
    """(N, h, w) grids, each moved by its (dy, dx) in {0, shift, 2 shift} into the grid padded by `shift` with
    `fill`: a move of +shift, 0 or -shift cells along each axis."""
    h, w = grids.shape[1:]
    padded = np.pad(grids, ((0, 0), (shift, shift), (shift, shift)), constant_values=fill)
    return np.stack([g[dy:dy + h, dx:dx + w] for g, (dy, dx) in zip(padded, offsets)])


class ShiftedGrids(keras.utils.PyDataset):
    """The prior's (inputs, targets) batches as train.py's --prior-augment makes them, in NumPy (the GPU machine has
    no TensorFlow): the training grids and their mirror images' grids, each batch's grids moved by a random -shift, 0
    or +shift codes along each axis, the empty frame's code filling what a move uncovers; an epoch as many grids as
    the training split, reshuffled each epoch. With layouts (a two-level prior's, one cell per 2x2 codes) each
    grid's layout moves with it, by half as many cells."""

    def __init__(self, prior, codes: np.ndarray, features: np.ndarray, shift: int, batch_size: int, seed: int,
                 layouts: np.ndarray | None = None):
        super().__init__()
        self.prior, self.codes, self.features, self.layouts = prior, codes, features, layouts
        self.shift, self.batch_size = shift, batch_size
        self.fill = np.bincount(codes[:, 0, 0]).argmax()  # the corner code: an empty frame
        self.layout_fill = None if layouts is None else np.bincount(layouts[:, 0, 0]).argmax()
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self):
        return math.ceil(len(self.codes) / 2 / self.batch_size)  # the unmirrored split's size

    def __getitem__(self, index):
        picks = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        moves = self.rng.integers(0, 3, (len(picks), 2))  # 0, 1 or 2 shifts into the padded grid: +s, 0 or -s
        grids = moved(self.codes[picks], moves * self.shift, self.shift, self.fill)
        layouts = None
        if self.layouts is not None:
            half = self.shift // 2
            layouts = moved(self.layouts[picks], moves * half, half, self.layout_fill)
        inputs = self.prior.pack_inputs(grids, self.features[picks], layouts)
        return tuple(inputs) if isinstance(inputs, list) else inputs, self.prior.pack_targets(grids, layouts)

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.codes))


class Batches(keras.utils.PyDataset):
    """(images, images) batches of uint8 slices, shuffled each epoch, made float32 in [0, 1] one batch at a time."""

    def __init__(self, slices: np.ndarray, batch_size: int, seed: int):
        super().__init__()
        self.slices, self.batch_size, self.rng = slices, batch_size, np.random.default_rng(seed)
        self.order = self.rng.permutation(len(slices))

    def __len__(self):
        return math.ceil(len(self.slices) / self.batch_size)

    def __getitem__(self, index):
        images = as_images(self.slices[np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])])
        return images, images

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.slices))


def timed_steps(build, data, steps: int) -> float:
    """Seconds per training step of a freshly built model, after its first (compiling) step."""
    steps = max(1, min(steps, len(data)))  # no more steps than one pass has batches
    model = build(1)
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    start = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, required=True, help="seconds of training, both stages together")
    parser.add_argument("--vqvae-share", type=float, default=0.6, help="the VQ-VAE's part of the budget (0.6)")
    parser.add_argument("--subjects", type=int, nargs=3, default=(300, 35, 17), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes building the set")
    parser.add_argument("--dtype", choices=("auto", "float32", "mixed_bfloat16"), default="auto",
                        help="auto: mixed_bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--learning-rate", type=float, help="the VQ-VAE's (default: the OASIS preset's)")
    parser.add_argument("--batch-size", type=int, help="the VQ-VAE's (default: the OASIS preset's)")
    parser.add_argument("--samples", type=int, default=16, help="grids sampled at once (default 16)")
    args = parser.parse_args(argv)
    config = run_state.Config()
    config = dataclasses.replace(config, **{k: v for k, v in dict(learning_rate=args.learning_rate,
                                                                  batch_size=args.batch_size).items() if v})
    devices = keras.distribution.list_devices()
    dtype = args.dtype if args.dtype != "auto" else ("mixed_bfloat16" if "gpu" in str(devices).lower() else "float32")
    print(f"Keras {keras.__version__} on {keras.backend.backend()}, {devices}; {dtype}")

    start = time.perf_counter()
    data = build_set(tuple(args.subjects), args.workers)
    print(f"built {sum(args.subjects)} subjects ({', '.join(f'{len(v[0])} {k}' for k, v in data.items())} slices) "
          f"in {time.perf_counter() - start:.0f} s with {args.workers} processes")
    train_slices, _ = data["train"]
    test_images = as_images(data["test"][0])
    began = time.time()
    deadline_vqvae = began + args.budget * args.vqvae_share

    # Stage 1: time a few steps, then train a VQ-VAE whose schedule spans the steps that fit
    batches = Batches(train_slices, config.batch_size, config.seed)
    steps_per_epoch = len(batches)
    step = timed_steps(lambda epochs: modules.new_vqvae(dataclasses.replace(config, epochs=epochs), steps_per_epoch,
                                                        dtype, jit_compile=True), batches, 5)
    steps = max(int((deadline_vqvae - time.time()) / step * 0.95), 1)
    vqvae = modules.new_vqvae(dataclasses.replace(config, epochs=max(1, round(steps / steps_per_epoch))),
                              steps_per_epoch, dtype, jit_compile=True)
    sample = as_images(train_slices[np.random.default_rng(0).choice(len(train_slices), min(512, len(train_slices)),
                                                                    replace=False)])
    stop = StopAt(deadline_vqvae)
    vqvae.fit(batches, epochs=10_000, verbose=2, callbacks=[train.RestartUnusedCodes(sample, config.seed), stop])
    vqvae_rate, vqvae_steps = config.batch_size / step, stop.steps
    evaluated = modules.full_precision(vqvae)
    recon, _ = utils.reconstruct(evaluated, test_images)
    held_out = float(np.mean(utils.ssim(test_images, recon)))
    floor = float(np.mean(utils.ssim(test_images, utils.bilinear_baseline(test_images, config.downsample))))
    print(f"VQ-VAE: {vqvae_rate:,.0f} images/s ({OASIS_TRAIN_SLICES / vqvae_rate:.1f} s per OASIS epoch), "
          f"{vqvae_steps} steps ({vqvae_steps / steps_per_epoch:.1f} epochs); held-out SSIM {held_out:.4f} beside "
          f"the bilinear x{config.downsample} floor {floor:.4f}")

    # Stage 2: the depth-conditioned prior on the code grids (with the preset's flips and shifts, as train.py)
    def encoded(slices):
        return np.concatenate([np.asarray(evaluated.encode(as_images(slices[i:i + 64])))
                               for i in range(0, len(slices), 64)]).astype("int32")

    codes = encoded(train_slices)
    features = np.asarray(modules.slice_position_features(data["train"][1], config.prior_position_frequencies))
    if config.prior_augment:
        codes, features = np.concatenate([codes, encoded(train_slices[:, :, ::-1])]), np.concatenate([features] * 2)
    layouts = (utils.code_layouts(evaluated, codes, config.prior_layout_levels).astype("int32")
               if config.prior_layout_levels else None)  # a two-level prior's layouts, as train.py makes them
    prior_steps_per_epoch = math.ceil(len(train_slices) / config.prior_batch_size)

    def new_prior(epochs):
        return modules.new_prior(dataclasses.replace(config, prior_epochs=epochs), prior_steps_per_epoch, dtype,
                                 jit_compile=True)

    def prior_fit(prior, **kwargs):
        if config.prior_augment:
            prior.fit(ShiftedGrids(prior, codes, features, config.prior_augment, config.prior_batch_size,
                                   config.seed, layouts), **kwargs)
        else:
            prior.fit(prior.pack_inputs(codes, features, layouts), prior.pack_targets(codes, layouts),
                      batch_size=config.prior_batch_size, **kwargs)

    probe = new_prior(1)
    prior_fit(probe, epochs=1, steps_per_epoch=1, verbose=0)
    probe_start = time.perf_counter()
    prior_fit(probe, epochs=1, steps_per_epoch=5, verbose=0)
    prior_step = (time.perf_counter() - probe_start) / 5
    deadline = began + args.budget
    prior_steps = max(int((deadline - time.time()) / prior_step * 0.95), 1)
    prior = new_prior(max(1, round(prior_steps / prior_steps_per_epoch)))
    stop = StopAt(deadline)
    prior_fit(prior, epochs=10_000, verbose=2, callbacks=[stop])
    prior_rate = config.prior_batch_size / prior_step
    print(f"prior: {prior_rate:,.0f} grids/s ({OASIS_TRAIN_SLICES / prior_rate:.1f} s per OASIS epoch), "
          f"{stop.steps} steps ({stop.steps / prior_steps_per_epoch:.1f} epochs)")

    # Sampling: predict.py's sampler, timed on a first call (compilation included) and a second
    sample = predict.make_sampler(modules.full_precision(prior), temperature=1.0, seed=config.seed)
    depths = np.linspace(0.2, 0.8, args.samples)
    start = time.perf_counter()
    sample(args.samples, depths)
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    grids = sample(args.samples, depths, stream=1)
    sample_seconds = time.perf_counter() - start
    compile_seconds = first_seconds - sample_seconds
    assert grids.shape == (args.samples, config.grid_size, config.grid_size)
    print(f"sampler: compiled in {compile_seconds:.1f} s; {args.samples} grids of {config.grid_size}x"
          f"{config.grid_size} in {sample_seconds:.2f} s")
    print(json.dumps({
        "benchmark": "oasis_budget", "backend": keras.backend.backend(), "devices": str(devices), "dtype": dtype,
        "subjects": list(args.subjects), "budget_s": args.budget, "batch": config.batch_size,
        "learning_rate": config.learning_rate, "vqvae_images_per_s": round(vqvae_rate, 1),
        "vqvae_s_per_oasis_epoch": round(OASIS_TRAIN_SLICES / vqvae_rate, 1), "vqvae_steps": vqvae_steps,
        "prior_steps": stop.steps, "prior_augment": config.prior_augment,
        "prior_layout_levels": config.prior_layout_levels,
        "held_out_ssim": round(held_out, 4), "bilinear_floor_ssim": round(floor, 4),
        "prior_grids_per_s": round(prior_rate, 1), "prior_s_per_oasis_epoch": round(OASIS_TRAIN_SLICES / prior_rate, 1),
        "sampler_compile_s": round(compile_seconds, 2), "sample_s": round(sample_seconds, 3),
        "samples": args.samples, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
