"""Trains the VQ-VAE on brain MRI slices and writes a run folder.

    python train.py --demo                      # builds the demo set into data/demo, trains a CPU-sized model
    python train.py --data-dir PATH/TO/OASIS    # the OASIS preset (256 px, batch 128), meant for a GPU

Run folder runs/NAME/: config.json, vqvae.keras, history.csv, ssim.png, losses.png, recon.png, metrics.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: hide its C++ start-up chatter

import argparse
import csv
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
    parser.add_argument("--stage", choices=STAGES, default="vqvae",
                        help="vqvae: train the VQ-VAE (default); prior and all come with the PixelCNN prior")
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
    return dict(train=train, val_images=val_images, train_sample=train_sample)


class EpochReport(keras.callbacks.Callback):
    """After each epoch: SSIM on the validation split and on the train sample, validation MSE and codebook usage
    go into the logs; history.csv and the curves are rewritten, so a run can be watched while it trains."""

    def __init__(self, val_images, train_sample, run_dir: Path, floors: dict, num_embeddings: int):
        super().__init__()
        self.val_images, self.train_sample = val_images, train_sample
        self.run_dir, self.floors, self.num_embeddings = run_dir, floors, num_embeddings
        self.history: dict[str, list] = {}
        self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        val_recon, val_codes = utils.reconstruct(self.model, self.val_images)
        train_recon, _ = utils.reconstruct(self.model, self.train_sample)
        logs["val_ssim"] = float(np.mean(utils.ssim(self.val_images, val_recon)))
        logs["train_ssim"] = float(np.mean(utils.ssim(self.train_sample, train_recon)))
        logs["val_mse"] = float(np.mean((self.val_images - val_recon) ** 2))
        usage = modules.codebook_usage(val_codes, self.num_embeddings)
        logs["val_perplexity"], logs["val_codes_used"] = usage["perplexity"], usage["codes_used"]
        logs["seconds"] = time.time() - self.start
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        print(f"epoch {epoch + 1}: val SSIM {logs['val_ssim']:.4f} (train {logs['train_ssim']:.4f}), "
              f"codes used {usage['codes_used']}/{self.num_embeddings}, perplexity {usage['perplexity']:.1f}")
        write_history(self.run_dir / "history.csv", self.history)
        utils.plot_curves(self.run_dir / "ssim.png", self.history,
                          {"train_ssim": "train (sample)", "val_ssim": "validation"}, "mean SSIM",
                          "VQ-VAE reconstruction SSIM", floors=self.floors)
        utils.plot_curves(self.run_dir / "losses.png", self.history,
                          {"loss": "train total (MSE + VQ)", "mse": "train MSE", "val_mse": "validation MSE"},
                          "loss", "VQ-VAE losses")


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


def train_vqvae(config: Config, data: dict, run_dir: Path) -> dict:
    keras.utils.set_random_seed(config.seed)
    model = modules.VQVAE(**config.vqvae_kwargs())
    model.build((None, config.image_size, config.image_size, 1))
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss="mse",
                  metrics=[keras.metrics.MeanSquaredError(name="mse")])
    floors = baseline_floors(data["val_images"], config.downsample)
    report = EpochReport(data["val_images"], data["train_sample"], run_dir, floors, config.num_embeddings)
    print(f"VQ-VAE: {model.count_params():,} parameters, code grid {config.image_size // config.downsample}^2, "
          f"K={config.num_embeddings}, D={config.embedding_dim}")
    start = time.time()
    callbacks = [RestartUnusedCodes(data["train_sample"], config.seed), report]
    model.fit(data["train"], epochs=config.epochs, callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2,
              shuffle=False)  # the dataset shuffles itself
    seconds = time.time() - start
    save_model(model, run_dir / "vqvae.keras")

    val_recon, val_codes = utils.reconstruct(model, data["val_images"])
    show = np.linspace(0, len(val_recon) - 1, 8).astype(int)
    utils.plot_image_rows(run_dir / "recon.png", {"validation originals": data["val_images"][show],
                                                  "reconstructions": val_recon[show]},
                          title=f"VQ-VAE reconstructions, mean validation SSIM {report.history['val_ssim'][-1]:.3f}")
    metrics = {"epochs": config.epochs, "train_seconds": round(seconds, 1),
               "val_ssim": report.history["val_ssim"][-1], "val_ssim_floors": floors,
               **{f"val_{k}": v for k, v in modules.codebook_usage(val_codes, config.num_embeddings).items()},
               "num_embeddings": config.num_embeddings}
    utils.update_metrics(run_dir, "vqvae", metrics)
    return metrics


def run(args: argparse.Namespace) -> Path:
    config = utils.config_from_args(args)
    config.validate()
    if args.stage != "vqvae":
        raise UserError(f"--stage {args.stage} needs the PixelCNN prior, which this version does not have yet; "
                        "use --stage vqvae")
    run_dir = Path(config.runs_dir) / utils.new_run_name(config)
    if run_dir.exists():
        raise UserError(f"run folder {run_dir} already exists; pick another --name so it is not overwritten")
    data = prepare_data(config, args.demo)  # every data error surfaces here, before the run folder exists

    run_dir.mkdir(parents=True)
    try:
        utils.save_config(config, run_dir)
        metrics = train_vqvae(config, data, run_dir)
    except BaseException:
        if not (run_dir / "vqvae.keras").exists():  # nothing worth keeping: leave no half-made run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    floors = ", ".join(f"{k} {v:.3f}" for k, v in metrics["val_ssim_floors"].items())
    print(f"done in {metrics['train_seconds']:.0f} s: validation SSIM {metrics['val_ssim']:.4f} ({floors}); "
          f"codes used {metrics['val_codes_used']}/{config.num_embeddings}. Run folder: {run_dir}")
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
