"""Trains the VQ-VAE and its PixelCNN prior on brain MRI slices and writes a run folder.

    python train.py --demo                      # builds the demo set into data/demo, trains a CPU-sized model
    python train.py --data-dir PATH/TO/OASIS    # the OASIS preset (256 px, batch 128), meant for a GPU

    python train.py --stage prior --run runs/NAME   # (re)train only the prior of an existing run

Stage 1 trains the VQ-VAE; stage 2 encodes the train and validation splits into code grids once and trains the
PixelCNN prior on them. Run folder runs/NAME/: config.json, metrics.json; vqvae.keras, history.csv, ssim.png,
losses.png, recon.png (stage 1); codes_train.npy, codes_validate.npy, prior.keras, prior_history.csv,
prior_loss.png (stage 2).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: hide its C++ start-up chatter

import argparse
import csv
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import keras
import numpy as np

import dataset
import modules
import utils
from utils import Config, UserError

STAGES = ("vqvae", "prior", "all")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--demo", action="store_true",
                        help="use the built-in demo set (built into data/demo if missing) and the CPU preset")
    parser.add_argument("--stage", choices=STAGES, default="all",
                        help="all: VQ-VAE then prior (default); vqvae: the VQ-VAE alone; prior: the prior of --run")
    parser.add_argument("--run", help="with --stage prior: the run folder whose VQ-VAE the prior is trained on")
    utils.add_config_arguments(parser)
    return parser.parse_args(argv)


def prepare_data(config: Config, demo: bool) -> dict:
    """Finds, checks and decodes the train and validation splits (before any run folder is created)."""
    if demo and not Path(config.data_dir).exists():
        dataset.make_demo(config.data_dir)
    train_files = dataset.split_files(config.data_dir, "train")
    val_files = dataset.split_files(config.data_dir, "validate")
    print(f"data: {len(train_files)} train / {len(val_files)} validation slices from {config.data_dir}, "
          f"at {config.image_size}x{config.image_size}")
    train = dataset.make_dataset(train_files, config.image_size, config.batch_size, shuffle=True, seed=config.seed)
    val_images = dataset.load_images(val_files, config.image_size)
    # Train SSIM is measured on a fixed sample of training slices as large as the validation split.
    pick = np.random.default_rng(config.seed).choice(len(train_files), min(len(val_files), len(train_files)),
                                                     replace=False)
    train_sample = dataset.load_images([train_files[i] for i in sorted(pick)], config.image_size)
    return dict(train=train, num_train=len(train_files), val_images=val_images, train_sample=train_sample)


class EpochReport(keras.callbacks.Callback):
    """After each epoch: SSIM on the validation split and on the train sample, validation MSE and codebook usage
    go into the logs (and from there into history.csv)."""

    def __init__(self, val_images, train_sample, num_embeddings: int):
        super().__init__()
        self.val_images, self.train_sample, self.num_embeddings = val_images, train_sample, num_embeddings

    def on_epoch_end(self, epoch, logs=None):
        val_recon, val_codes = utils.reconstruct(self.model, self.val_images)
        train_recon, _ = utils.reconstruct(self.model, self.train_sample)
        logs["val_ssim"] = float(np.mean(utils.ssim(self.val_images, val_recon)))
        logs["train_ssim"] = float(np.mean(utils.ssim(self.train_sample, train_recon)))
        logs["val_mse"] = float(np.mean((self.val_images - val_recon) ** 2))
        usage = modules.codebook_usage(val_codes, self.num_embeddings)
        logs["val_perplexity"], logs["val_codes_used"] = usage["perplexity"], usage["codes_used"]
        print(f"epoch {epoch + 1}: val SSIM {logs['val_ssim']:.4f} (train {logs['train_ssim']:.4f}), "
              f"codes used {usage['codes_used']}/{self.num_embeddings}, perplexity {usage['perplexity']:.1f}")


class BitsPerCode(keras.callbacks.Callback):
    """Adds the prior's cross-entropy in bits per code (nats / ln 2) to the logs."""

    def on_epoch_end(self, epoch, logs=None):
        logs["bits_per_code"] = logs["loss"] / np.log(2)
        logs["val_bits_per_code"] = logs["val_loss"] / np.log(2)
        print(f"epoch {epoch + 1}: validation NLL {logs['val_bits_per_code']:.3f} bits/code "
              f"(train {logs['bits_per_code']:.3f}; uniform would be {np.log2(self.model.num_embeddings):.1f})")


class CurveWriter(keras.callbacks.Callback):
    """Keeps every epoch's logs; after each epoch rewrites the history CSV and the plots, so a run can be watched
    while it trains. plots: list of (file name, {column: label}, y label, title, floors)."""

    def __init__(self, run_dir: Path, csv_name: str, plots: list):
        super().__init__()
        self.run_dir, self.csv_name, self.plots = run_dir, csv_name, plots
        self.history: dict[str, list] = {}
        self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs["seconds"] = time.time() - self.start
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        write_history(self.run_dir / self.csv_name, self.history)
        for name, series, ylabel, title, floors in self.plots:
            utils.plot_curves(self.run_dir / name, self.history, series, ylabel, title, floors=floors)


class RestartUnusedCodes(keras.callbacks.Callback):
    """Before each epoch after the first, codes that no vector of the training sample picks are moved onto
    encoder outputs of that sample (codebook collapse otherwise leaves most of the codebook unused)."""

    def __init__(self, train_sample: np.ndarray, seed: int):
        super().__init__()
        self.train_sample, self.seed = train_sample, seed

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 0:
            return
        z_e = np.concatenate([np.asarray(self.model.encoder(self.train_sample[i:i + 64]))
                              for i in range(0, len(self.train_sample), 64)])
        moved = self.model.quantizer.restart_unused_codes(z_e, seed=self.seed + epoch)
        if moved:
            print(f"restarted {moved} unused codes from encoder outputs")


def write_history(path: Path, history: dict) -> None:
    columns = list(history)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", *columns])
            for i in range(len(history[columns[0]])):
                writer.writerow([i + 1, *(f"{history[c][i]:.6g}" for c in columns)])

    utils.atomic_write(path, write)


def save_model(model, path: Path) -> None:
    utils.atomic_write(path, model.save)  # the temp name keeps the .keras suffix that model.save requires


def baseline_floors(images: np.ndarray, downsample: int) -> dict:
    """Mean SSIM of the trivial reconstructions, the floors a model's SSIM must be read against."""
    return {"all-black": float(np.mean(utils.ssim(images, np.zeros_like(images)))),
            f"bilinear x{downsample} down/up": float(np.mean(utils.ssim(images,
                                                                           utils.bilinear_baseline(images, downsample))))}


def cosine_schedule(learning_rate: float, epochs: int, steps_per_epoch: int):
    """Cosine decay to 5% of the initial rate over the whole run: the last epochs settle instead of jumping."""
    return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(epochs * steps_per_epoch, 1),
                                                  alpha=0.05)


def fit_verbosity() -> int:
    return 1 if sys.stdout.isatty() else 2  # progress bars in a terminal, one line per epoch in a log file


def train_vqvae(config: Config, data: dict, run_dir: Path) -> dict:
    keras.utils.set_random_seed(config.seed)
    model = modules.VQVAE(**config.vqvae_kwargs())
    model.build((None, config.image_size, config.image_size, 1))
    steps = int(np.ceil(data["num_train"] / config.batch_size))
    model.compile(optimizer=keras.optimizers.Adam(cosine_schedule(config.learning_rate, config.epochs, steps)),
                  loss="mse", metrics=[keras.metrics.MeanSquaredError(name="mse")])
    floors = baseline_floors(data["val_images"], config.downsample)
    curves = CurveWriter(run_dir, "history.csv", [
            ("ssim.png", {"train_ssim": "train (sample)", "val_ssim": "validation"}, "mean SSIM",
             "VQ-VAE reconstruction SSIM", floors),
            ("losses.png", {"loss": "train total (MSE + VQ)", "mse": "train MSE", "val_mse": "validation MSE"},
             "loss", "VQ-VAE losses", None)])
    callbacks = [RestartUnusedCodes(data["train_sample"], config.seed),
                 EpochReport(data["val_images"], data["train_sample"], config.num_embeddings), curves]
    print(f"VQ-VAE: {model.count_params():,} parameters, code grid {config.grid_size}x{config.grid_size}, "
          f"K={config.num_embeddings}, D={config.embedding_dim}")
    start = time.time()
    model.fit(data["train"], epochs=config.epochs, callbacks=callbacks, verbose=fit_verbosity(),
              shuffle=False)  # the dataset shuffles itself
    seconds = time.time() - start
    save_model(model, run_dir / "vqvae.keras")

    val_recon, val_codes = utils.reconstruct(model, data["val_images"])
    val_ssim = curves.history["val_ssim"][-1]
    show = np.linspace(0, len(val_recon) - 1, 8).astype(int)
    utils.plot_image_rows(run_dir / "recon.png", {"validation originals": data["val_images"][show],
                                                  "reconstructions": val_recon[show]},
                          title=f"VQ-VAE reconstructions, mean validation SSIM {val_ssim:.3f}")
    metrics = {"epochs": config.epochs, "train_seconds": round(seconds, 1), "val_ssim": val_ssim,
               "val_ssim_floors": floors, "num_embeddings": config.num_embeddings,
               **{f"val_{k}": v for k, v in modules.codebook_usage(val_codes, config.num_embeddings).items()}}
    utils.update_metrics(run_dir, "vqvae", metrics)
    floors_text = ", ".join(f"{k} {v:.3f}" for k, v in floors.items())
    print(f"VQ-VAE done in {seconds:.0f} s: validation SSIM {val_ssim:.4f} ({floors_text}); "
          f"codes used {metrics['val_codes_used']}/{config.num_embeddings}")
    return metrics


def encode_files(vqvae, files: list[str], image_size: int, chunk: int = 1024) -> np.ndarray:
    """PNG files -> (N, h, w) int16 code grids, decoding `chunk` files at a time to bound memory."""
    return np.concatenate([utils.reconstruct(vqvae, dataset.load_images(files[i:i + chunk], image_size))[1]
                           for i in range(0, len(files), chunk)]).astype(np.int16)


def cached_codes(vqvae, config: Config, run_dir: Path, split: str) -> np.ndarray:
    """The code grids of a split, encoded once and kept as run_dir/codes_SPLIT.npy."""
    path = run_dir / f"codes_{split}.npy"
    if path.is_file():
        return np.load(path)
    files = dataset.split_files(config.data_dir, split)
    start = time.time()
    codes = encode_files(vqvae, files, config.image_size)
    utils.atomic_write(path, lambda tmp: np.save(tmp, codes))
    print(f"encoded the {split} split: {codes.shape[0]} code grids of {codes.shape[1]}x{codes.shape[2]} "
          f"in {time.time() - start:.0f} s -> {path.name}")
    return codes


def train_prior(config: Config, run_dir: Path) -> dict:
    vqvae = utils.load_model(run_dir / "vqvae.keras")
    codes = {split: cached_codes(vqvae, config, run_dir, split) for split in ("train", "validate")}
    utils.save_config(config, run_dir)  # only now: with --stage prior, a data error must leave the run as it was
    keras.utils.set_random_seed(config.seed)
    prior = modules.PixelCNNPrior(**config.prior_kwargs())
    prior.build((None, config.grid_size, config.grid_size))
    steps = int(np.ceil(len(codes["train"]) / config.prior_batch_size))
    prior.compile(optimizer=keras.optimizers.Adam(cosine_schedule(config.prior_learning_rate,
                                                                  config.prior_epochs, steps)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    curves = CurveWriter(run_dir, "prior_history.csv", [
        ("prior_loss.png", {"bits_per_code": "train", "val_bits_per_code": "validation"}, "NLL (bits per code)",
         "PixelCNN prior", None)])
    print(f"PixelCNN prior: {prior.count_params():,} parameters, {config.prior_layers} gated layers, receptive "
          f"field {prior.receptive_rows()} rows of the {config.grid_size}x{config.grid_size} grid")
    start = time.time()
    train_codes, val_codes = codes["train"].astype("int32"), codes["validate"].astype("int32")
    prior.fit(train_codes, train_codes, validation_data=(val_codes, val_codes), batch_size=config.prior_batch_size,
              epochs=config.prior_epochs, callbacks=[BitsPerCode(), curves], verbose=fit_verbosity())
    seconds = time.time() - start
    save_model(prior, run_dir / "prior.keras")
    metrics = {"epochs": config.prior_epochs, "train_seconds": round(seconds, 1),
               "val_bits_per_code": curves.history["val_bits_per_code"][-1],
               "train_bits_per_code": curves.history["bits_per_code"][-1],
               "uniform_bits_per_code": float(np.log2(config.num_embeddings))}
    utils.update_metrics(run_dir, "prior", metrics)
    print(f"prior done in {seconds:.0f} s: validation NLL {metrics['val_bits_per_code']:.3f} bits/code")
    return metrics


def prior_stage_run(args: argparse.Namespace) -> tuple[Path, Config]:
    """The run folder and config for --stage prior: an existing run with a trained VQ-VAE and no prior yet."""
    if not args.run:
        raise UserError("--stage prior trains the prior of an existing run: pass --run runs/NAME")
    run_dir = Path(args.run)
    config = utils.load_run_config(run_dir)
    if not (run_dir / "vqvae.keras").is_file():
        raise UserError(f"{run_dir} has no trained VQ-VAE (vqvae.keras); train it first with "
                        "`python train.py --stage vqvae` or use --stage all")
    if (run_dir / "prior.keras").exists():
        raise UserError(f"{run_dir} already has a trained prior (prior.keras); move that file away first if you "
                        "want to train a new one")
    overrides = utils.config_overrides(args)
    fixed = [name for name in overrides if not name.startswith("prior_") and name not in ("data_dir", "seed")]
    if fixed:
        raise UserError(f"--{fixed[0].replace('_', '-')} belongs to the VQ-VAE that {run_dir} already trained; "
                        "with --stage prior only the --prior-* flags, --data-dir and --seed apply")
    config = dataclasses.replace(config, **overrides)
    config.validate()
    return run_dir, config


def run(args: argparse.Namespace) -> Path:
    if args.stage == "prior":
        run_dir, config = prior_stage_run(args)
        train_prior(config, run_dir)
        print(f"run folder: {run_dir}")
        return run_dir

    config = utils.config_from_args(args)
    config.validate()
    run_dir = Path(config.runs_dir) / utils.new_run_name(config)
    if run_dir.exists():
        raise UserError(f"run folder {run_dir} already exists; pick another --name so it is not overwritten")
    data = prepare_data(config, args.demo)  # every data error surfaces here, before the run folder exists

    run_dir.mkdir(parents=True)
    try:
        utils.save_config(config, run_dir)
        train_vqvae(config, data, run_dir)
    except BaseException:
        if not (run_dir / "vqvae.keras").exists():  # nothing worth keeping: leave no half-made run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if args.stage == "all":
        del data  # the images are not needed for the prior, which trains on codes
        train_prior(config, run_dir)
    print(f"run folder: {run_dir}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
