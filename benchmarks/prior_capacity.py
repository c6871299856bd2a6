"""What a larger, longer-trained prior buys the samples: priors of several sizes, each trained for the same wall-clock
budget on a run's cached code grids, their validation NLL per epoch, and code grids sampled at fixed depths at
three temperatures; with --augment, on training grids augmented by left-right flips and shifts. Any backend; made for a GPU machine with JAX and no TensorFlow (the run folder is all it reads).

    KERAS_BACKEND=jax python -m benchmarks.prior_capacity --run runs/NAME --budget 120 --sizes 32x6 128x12k5a1
    python -m benchmarks.prior_capacity --run runs/NAME --budget 20 --sizes 8x2 --out /tmp/capacity   # CPU check

A size is CHANNELSxLAYERS, optionally followed by kK (kernel size, default the run's) and aA (attention layers,
default 0). Every other setting is the run's. Writes into --out: capacity.json (also printed last) and
capacity_samples.npz (for each size and temperature, code grids of --rows rows at the depths of DEPTHS).
`--figure DIR` then decodes those grids with the run's VQ-VAE, beside the first test subject's slices at the same
depths, into DIR/capacity_SIZE.png (where the data is: the GPU machine has none).

--augment S: the training grids, their left-right mirror images (the training slices flipped and encoded, read from
RUN/codes_train_flipped.npz, which `--flip` writes where the data is) and both shifted by -S, 0 and +S codes along
each axis (9 x 2 = 18 grids per slice; S even, so that a layout cell stays 2x2 codes), the background code filling
what a shift uncovers: a brain's anatomy is (nearly) mirror-symmetric and lies anywhere in the frame, so these are
grids the prior should give as much probability as the originals, and a prior that memorised 1,536 grids must now
memorise 18 times as many.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import dataclasses
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import keras
import numpy as np

import dataset
import modules
import predict
import run_state
import train
import utils
from benchmarks.deadline import StopAt

DEPTHS = np.round(np.linspace(0, 31, 8)) / 31  # the columns of predict.py's depths.png for a 32-slice subject
TEMPERATURES = (1.0, 0.7, 0.0)
SIZE = re.compile(r"(\d+)x(\d+)(?:k(\d+))?(?:a(\d+))?$")


def parse_size(text: str, config: run_state.Config) -> run_state.Config:
    match = SIZE.match(text)
    if not match:
        raise SystemExit(f"error: --sizes takes CHANNELSxLAYERS[kKERNEL][aATTENTION] like 128x12k5a1, got {text!r}")
    channels, layers, kernel, attention = match.groups()
    return dataclasses.replace(config, prior_channels=int(channels), prior_layers=int(layers),
                               prior_kernel_size=int(kernel or config.prior_kernel_size),
                               prior_attention_layers=int(attention or 0))


class ValidationNLL(keras.callbacks.Callback):
    """Validation NLL in bits per code after every epoch, with the seconds since training began; with `snapshot`
    (n, depths, seed), also n code grids sampled at T=1 at those depths after every epoch (self.snapshots)."""

    def __init__(self, snapshot: tuple | None = None):
        super().__init__()
        self.curve, self.start, self.snapshot, self.snapshots = [], time.perf_counter(), snapshot, []

    def on_epoch_end(self, epoch, logs=None):
        self.curve.append([round(time.perf_counter() - self.start, 1), round(logs["val_loss"] / math.log(2), 4),
                           round(logs["loss"] / math.log(2), 4)])
        if self.snapshot:
            n, depths, seed = self.snapshot
            began = time.perf_counter()
            self.snapshots.append(predict.make_sampler(self.model, 1.0, seed)(n, depths).astype("int16"))
            self.start += time.perf_counter() - began  # sampling is not training time


def train_for(config: run_state.Config, budget: float, data: dict, vqvae, snapshot: tuple | None = None) -> tuple:
    """(prior trained for `budget` seconds with a cosine schedule over the steps that fit, its summary)."""
    steps_per_epoch = math.ceil(len(data["train"][0]) / config.prior_batch_size)
    fit = dict(batch_size=config.prior_batch_size, verbose=0)
    probe = modules.new_prior(config, steps_per_epoch, jit_compile=True)  # times the step; shapes the inputs
    (train_inputs, train_targets), (val_inputs, val_targets) = (
        train.prior_inputs(probe, *data[split], vqvae) for split in ("train", "validate"))
    probe.fit(train_inputs, train_targets, epochs=1, steps_per_epoch=1, **fit)
    start = time.perf_counter()
    probe.fit(train_inputs, train_targets, epochs=1, steps_per_epoch=5, **fit)
    step = (time.perf_counter() - start) / 5
    epochs = max(1, int(budget / (step * steps_per_epoch + 0.1)))  # + a validation pass per epoch
    prior = modules.new_prior(dataclasses.replace(config, prior_epochs=epochs), steps_per_epoch, jit_compile=True)
    curve, stop = ValidationNLL(snapshot), StopAt(seconds=budget)
    prior.fit(train_inputs, train_targets, epochs=epochs, validation_data=(val_inputs, val_targets),
              callbacks=[curve, stop], **fit)
    summary = {"parameters": prior.count_params(), "step_ms": round(1000 * step, 2), "epochs": len(curve.curve),
               "val_bits_per_code": curve.curve[-1][1], "train_bits_per_code": curve.curve[-1][2],
               "best_val_bits_per_code": min(c[1] for c in curve.curve), "curve_s_val_train": curve.curve}
    return prior, summary, curve.snapshots


def augmented(codes: np.ndarray, positions: np.ndarray, flipped: np.ndarray, shift: int) -> tuple:
    """Training grids (N, h, w), flipped and shifted (see --augment), and their positions: 18N of each."""
    grids, kept = [], []
    for source in (codes, flipped):
        background = np.bincount(source[:, 0, 0].astype("int64")).argmax()  # the corner code: empty frame
        for dy in (-shift, 0, shift):
            for dx in (-shift, 0, shift):
                moved = np.full_like(source, background)
                h, w = source.shape[1:]
                moved[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                    source[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
                grids.append(moved)
                kept.append(positions)
    return np.concatenate(grids), np.concatenate(kept)


def figures(run: run_state.Run, folder: Path) -> None:
    """Decodes capacity_samples.npz of `folder` into one figure per size: real slices, then samples per temperature."""
    config, vqvae = run.read_config(), run.load_vqvae()
    test = dataset.Split.load(config.data_dir, "test", config.image_size)
    subjects = test.subjects()
    subject = subjects[0]
    real = [np.flatnonzero((subjects == subject) & np.isclose(test.positions, d))[0] for d in DEPTHS]
    with np.load(folder / "capacity_samples.npz") as saved:
        grids = {key: saved[key] for key in saved.files if "_t" in key}
    columns = len(DEPTHS)
    for size in dict.fromkeys(key.rsplit("_t", 1)[0] for key in grids):
        rows = {f"real: test {subject}": test.images[real]}
        for temperature in TEMPERATURES:
            images = utils.batched(vqvae.decode, grids[f"{size}_t{temperature}"].astype("int32"))
            shown = 1 if temperature == 0 else len(images) // columns  # greedy rows repeat
            rows.update({f"T={temperature} ({r + 1})": images[r * columns:(r + 1) * columns] for r in range(shown)})
        utils.plot_image_rows(folder / f"capacity_{size}.png", rows, title=f"prior {size}",
                              captions={f"real: test {subject}": [f"depth {d:.2f}" for d in DEPTHS]})
        print(f"wrote {folder / f'capacity_{size}.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run folder with a trained VQ-VAE and cached code grids")
    parser.add_argument("--budget", type=float, help="seconds of training per size")
    parser.add_argument("--sizes", nargs="+", default=["32x6", "128x12k5a1"], help="priors to train (see above)")
    parser.add_argument("--rows", type=int, default=3, help="samples per depth and temperature (default 3)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="output folder")
    parser.add_argument("--figure", type=Path, metavar="DIR", help="decode DIR/capacity_samples.npz into figures")
    parser.add_argument("--augment", type=int, default=0, metavar="S", help="flips and shifts of S codes (see above)")
    parser.add_argument("--flip", action="store_true", help="write RUN/codes_train_flipped.npz (needs the data)")
    parser.add_argument("--snapshots", type=int, default=0, metavar="N",
                        help="after every epoch, sample N grids at T=1 at the depths of N validation slices (saved as "
                             "SIZE_eEPOCH, their depths as snapshot_depths): realism against training time")
    args = parser.parse_args(argv)
    run = run_state.Run.open(args.run)
    if args.figure:
        figures(run, args.figure)
        return 0
    if args.flip:  # what train.py's prior stage encodes for --prior-augment, into the same file
        config = run.read_config()
        train.encoded_split(run, run.load_vqvae(), config, "train", flipped=True)
        return 0
    if not args.budget:
        parser.error("--budget is needed to train")
    config, vqvae = run.read_config(), run.load_vqvae()
    data = {split: run.read_codes(split) for split in ("train", "validate")}
    if any(value is None for value in data.values()):
        raise SystemExit(f"error: {run.path} has no cached code grids; train its prior stage first")
    if args.augment:
        flipped = run.read_codes("train_flipped")
        if flipped is None:
            raise SystemExit(f"error: {run.path} has no codes_train_flipped.npz; write it first with --flip")
        data["train"] = augmented(*data["train"], flipped[0], args.augment)
        print(f"augmented: {len(data['train'][0])} training grids")
    print(f"Keras {keras.__version__} on {keras.backend.backend()}: {keras.distribution.list_devices()}")
    args.out.mkdir(parents=True, exist_ok=True)
    n, depths = len(DEPTHS) * args.rows, np.tile(DEPTHS, args.rows)
    results, grids = {}, {}
    for text in args.sizes:
        sized = parse_size(text, config)
        snapshot = None
        if args.snapshots:
            picks = np.random.default_rng(config.seed).permutation(len(data["validate"][1]))[:args.snapshots]
            grids["snapshot_depths"] = data["validate"][1][picks]
            snapshot = (len(picks), grids["snapshot_depths"], config.seed)
        prior, summary, snapshots = train_for(sized, args.budget, data, vqvae, snapshot)
        grids.update({f"{text}_e{epoch + 1}": codes for epoch, codes in enumerate(snapshots)})
        start = time.perf_counter()
        for temperature in TEMPERATURES:  # predict.py's sampler: compiled once per temperature
            sample = predict.make_sampler(prior, temperature, config.seed)
            grids[f"{text}_t{temperature}"] = sample(n, depths).astype("int16")
        summary["sample_s_per_temperature"] = round((time.perf_counter() - start) / len(TEMPERATURES), 2)
        results[text] = summary
        print(f"{text}: {summary['parameters']:,} parameters, {summary['step_ms']} ms/step, {summary['epochs']} "
              f"epochs in {args.budget:.0f} s: validation NLL {summary['val_bits_per_code']:.3f} bits/code (best "
              f"{summary['best_val_bits_per_code']:.3f}, train {summary['train_bits_per_code']:.3f})", flush=True)
        np.savez(args.out / "capacity_samples.npz", depths=DEPTHS, rows=args.rows, **grids)  # after each size
    result = {"benchmark": "prior_capacity", "run": str(run.path), "backend": keras.backend.backend(),
              "budget_s": args.budget, "augment": args.augment, "temperatures": TEMPERATURES, "sizes": results,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    (args.out / "capacity.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
