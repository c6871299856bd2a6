"""Trains the VQ-VAE and its PixelCNN prior on brain MRI slices and writes a run folder.

    python train.py --demo                      # builds the demo set into data/demo, trains a CPU-sized model
    python train.py --data-dir PATH/TO/OASIS    # the OASIS preset (256 px, batch 128), meant for a GPU

    python train.py --stage prior --run runs/NAME   # (re)train only the prior of an existing run

Speed and scale (not part of the run's config; a resumed run may change them): --devices N trains on N GPUs
with MirroredStrategy (default: every visible GPU); --mixed-precision computes in bfloat16/float16 with the
quantizer, losses and outputs in float32 (default on with a GPU); --xla compiles the training step with XLA
(default on with one GPU, off on CPU, where it measured slower: benchmarks/train_throughput.py).

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
import json
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
    parser.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last completed epoch")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="replicas for MirroredStrategy: the first N GPUs (default: all visible); on a machine "
                             "without GPUs, N > 1 splits the CPU into N logical devices (for testing)")
    parser.add_argument("--mixed-precision", choices=PRECISIONS, default="auto",
                        help="auto (default): bfloat16 on GPUs that support it, float16 on older GPUs, off on CPU")
    parser.add_argument("--xla", choices=("auto", "on", "off"), default="auto",
                        help="XLA-compile the training step; auto (default): on with one GPU, off otherwise")
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


PRECISIONS = ("auto", "off", "bfloat16", "float16")


@dataclasses.dataclass
class Hardware:
    """Where and how the models train, set once per command from --devices, --mixed-precision and --xla."""

    strategy: object  # a tf.distribute strategy: the default one, or MirroredStrategy over several devices
    dtype: str  # the models' dtype policy: "float32", "mixed_bfloat16" or "mixed_float16"
    jit_compile: bool
    devices: list[str]

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def describe(self) -> str:
        return (f"{self.replicas} replica(s) on {', '.join(self.devices)}; {self.dtype}; "
                f"XLA {'on' if self.jit_compile else 'off'}")


def setup_hardware(args: argparse.Namespace) -> Hardware:
    """Picks the devices, the precision and XLA. Must run before TensorFlow touches a device (logical CPU split)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    devices = args.devices if args.devices is not None else max(len(gpus), 1)
    if devices < 1:
        raise UserError(f"--devices must be 1 or more, got {devices}")
    if gpus and devices > len(gpus):
        raise UserError(f"--devices {devices} asks for more GPUs than the {len(gpus)} visible; pass --devices "
                        f"{len(gpus)} or fewer")
    names = [f"/gpu:{i}" if gpus else f"/cpu:{i}" for i in range(devices)]
    if devices == 1:
        strategy = tf.distribute.get_strategy()  # the default: no replication
    elif gpus:
        strategy = tf.distribute.MirroredStrategy(names)
    else:  # no GPU: N logical CPUs share the same cores, which tests replication but does not speed anything up
        try:
            tf.config.set_logical_device_configuration(
                tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * devices)
        except RuntimeError:
            raise UserError("--devices > 1 without a GPU splits the CPU, which must happen before TensorFlow "
                            "starts; run train.py as its own process") from None
        strategy = tf.distribute.MirroredStrategy(names)

    precision = args.mixed_precision
    if precision == "auto":
        precision = gpu_precision(gpus[0]) if gpus else "off"
    dtype = "float32" if precision == "off" else f"mixed_{precision}"
    jit_compile = args.xla == "on" or (args.xla == "auto" and bool(gpus) and devices == 1)
    return Hardware(strategy, dtype, jit_compile, names)


def gpu_precision(gpu) -> str:
    """bfloat16 where the GPU computes it natively (compute capability 8.0+: A100, H100, RTX 30xx on), else
    float16 (with loss scaling, which Keras adds for mixed_float16)."""
    import tensorflow as tf

    capability = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
    return "bfloat16" if tuple(capability) >= (8, 0) else "float16"


def check_batch_splits(batch_size: int, flag: str, hardware: Hardware) -> None:
    if batch_size % hardware.replicas:
        raise UserError(f"{flag} {batch_size} does not split evenly over {hardware.replicas} replicas; pass a "
                        f"multiple of {hardware.replicas} (it is the global batch, shared by the replicas)")


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
    while it trains. plots: list of (file name, {column: label}, y label, title, floors). A resumed stage
    passes the history of its completed epochs, and the curves continue from there."""

    def __init__(self, run_dir: Path, csv_name: str, plots: list, history: dict | None = None):
        super().__init__()
        self.run_dir, self.csv_name, self.plots = run_dir, csv_name, plots
        self.history: dict[str, list] = history or {}
        self.start = time.time() - (self.history["seconds"][-1] if self.history.get("seconds") else 0.0)

    def on_epoch_end(self, epoch, logs=None):
        logs["seconds"] = time.time() - self.start
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        write_history(self.run_dir / self.csv_name, self.history)
        for name, series, ylabel, title, floors in self.plots:
            utils.plot_curves(self.run_dir / name, self.history, series, ylabel, title, floors=floors)


class Checkpoint(keras.callbacks.Callback):
    """At each epoch end: the model with its optimizer state to STAGE.keras, then the epoch count to
    progress.json. Both are written atomically and progress.json last, so whenever the process dies, the
    checkpoint holds at least the epochs progress.json counts, and a resume continues from there."""

    def __init__(self, run_dir: Path, stage: str):
        super().__init__()
        self.run_dir, self.stage = run_dir, stage

    def on_epoch_end(self, epoch, logs=None):
        save_model(self.model, self.run_dir / f"{self.stage}.keras")
        write_progress(self.run_dir, self.stage, epochs_done=epoch + 1)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite batch loss, before anything of that epoch is saved."""

    def __init__(self, stage: str, flag: str, learning_rate: float, run_dir: Path):
        super().__init__()
        self.stage, self.flag, self.learning_rate, self.run_dir = stage, flag, learning_rate, run_dir
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = float(logs["loss"])
        if not np.isfinite(loss):
            if self.epoch:
                kept = f"its checkpoint of epoch {self.epoch} in {self.run_dir} is kept"
            else:
                kept = f"before any {self.stage} epoch finished"
            if self.stage == "prior":
                kept += "; the trained VQ-VAE is kept"
            raise Diverged(f"the {self.stage} loss became {loss} in epoch {self.epoch + 1}, {kept}. "
                           f"Lower {self.flag} (it was {self.learning_rate:g}) and train again")


class Diverged(UserError):
    """Training produced a NaN or infinite loss."""


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


def read_history(path: Path, epochs: int) -> dict:
    """The first `epochs` rows of a history CSV as {column: [values]} (a resumed stage continues it)."""
    if epochs == 0 or not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))[:epochs]
    return {column: [float(row[column]) for row in rows] for column in rows[0] if column != "epoch"}


def save_model(model, path: Path) -> None:
    utils.atomic_write(path, model.save)  # the temp name keeps the .keras suffix that model.save requires


PROGRESS = "progress.json"  # {"stages": "all", "vqvae": {"epochs_done": 3, "finished": false}, "prior": {...}}


def read_progress(run_dir: Path) -> dict:
    path = run_dir / PROGRESS
    return json.loads(path.read_text()) if path.is_file() else {}


def write_progress(run_dir: Path, stage: str, **values) -> None:
    progress = read_progress(run_dir)
    progress[stage] = {**progress.get(stage, {}), **values}
    utils.write_json(run_dir / PROGRESS, progress)


def stage_state(run_dir: Path, stage: str) -> tuple[int, bool]:
    """(epochs completed, finished) of a stage in a run folder."""
    state = read_progress(run_dir).get(stage, {})
    return state.get("epochs_done", 0), state.get("finished", False)


def baseline_floors(images: np.ndarray, downsample: int) -> dict:
    """Mean SSIM of the trivial reconstructions, the floors a model's SSIM must be read against."""
    baselines = {"all-black": np.zeros_like(images),
                 f"bilinear x{downsample} down/up": utils.bilinear_baseline(images, downsample)}
    return {name: float(np.mean(utils.ssim(images, output))) for name, output in baselines.items()}


def cosine_schedule(learning_rate: float, epochs: int, steps_per_epoch: int):
    """Cosine decay to 5% of the initial rate over the whole run: the last epochs settle instead of jumping."""
    return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(epochs * steps_per_epoch, 1),
                                                  alpha=0.05)


def fit_verbosity() -> int:
    return 1 if sys.stdout.isatty() else 2  # progress bars in a terminal, one line per epoch in a log file


def new_vqvae(config: Config, steps_per_epoch: int, dtype: str = "float32", jit_compile: bool = False):
    """The VQ-VAE of a config, built and compiled for training (seeded: same seed, same initial weights).
    Call it inside a strategy's scope to train on several devices."""
    keras.utils.set_random_seed(config.seed)
    model = modules.VQVAE(**config.vqvae_kwargs(), dtype=dtype)
    model.build((None, config.image_size, config.image_size, 1))
    schedule = cosine_schedule(config.learning_rate, config.epochs, steps_per_epoch)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse",
                  metrics=[keras.metrics.MeanSquaredError(name="mse")], jit_compile=jit_compile)
    return model


def new_prior(config: Config, steps_per_epoch: int, dtype: str = "float32", jit_compile: bool = False):
    """The PixelCNN prior of a config, built and compiled for training on code grids."""
    keras.utils.set_random_seed(config.seed)
    prior = modules.PixelCNNPrior(**config.prior_kwargs(), dtype=dtype)
    prior.build((None, config.grid_size, config.grid_size))
    schedule = cosine_schedule(config.prior_learning_rate, config.prior_epochs, steps_per_epoch)
    prior.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit_compile)
    return prior


def stage_model(run_dir: Path, stage: str, epochs_done: int, build, hardware: Hardware):
    """The model of a stage on the hardware: its checkpoint when resuming (with the weights, the optimizer state
    and the precision it started with), else build(dtype, jit_compile)."""
    with hardware.strategy.scope():  # variables created here are mirrored on every replica
        if not epochs_done:
            return build(hardware.dtype, hardware.jit_compile)
        model = utils.load_model(run_dir / f"{stage}.keras")
        model.jit_compile = hardware.jit_compile
    if model.dtype_policy.name != hardware.dtype:
        print(f"note: the {stage} checkpoint trains on in {model.dtype_policy.name}, the precision it started with")
    return model


def train_vqvae(config: Config, data: dict, run_dir: Path, hardware: Hardware) -> dict:
    """Trains (or, after a crash, continues) the VQ-VAE of run_dir, checkpointing every epoch."""
    epochs_done, _ = stage_state(run_dir, "vqvae")
    steps_per_epoch = int(np.ceil(data["num_train"] / config.batch_size))
    model = stage_model(run_dir, "vqvae", epochs_done,
                        lambda dtype, jit: new_vqvae(config, steps_per_epoch, dtype, jit), hardware)
    if epochs_done:  # the checkpoint carries the weights and the optimizer state (moments, step, schedule)
        print(f"resuming the VQ-VAE after epoch {epochs_done} of {config.epochs}")
    floors = baseline_floors(data["val_images"], config.downsample)
    curves = CurveWriter(run_dir, "history.csv", [
        ("ssim.png", {"train_ssim": "train (sample)", "val_ssim": "validation"}, "mean SSIM",
         "VQ-VAE reconstruction SSIM", floors),
        ("losses.png", {"loss": "train total (MSE + VQ)", "mse": "train MSE", "val_mse": "validation MSE"},
         "loss", "VQ-VAE losses", None)], history=read_history(run_dir / "history.csv", epochs_done))
    callbacks = [StopOnNonFiniteLoss("VQ-VAE", "--learning-rate", config.learning_rate, run_dir),
                 RestartUnusedCodes(data["train_sample"], config.seed),
                 EpochReport(data["val_images"], data["train_sample"], config.num_embeddings), curves,
                 Checkpoint(run_dir, "vqvae")]
    print(f"VQ-VAE: {model.count_params():,} parameters, code grid {config.grid_size}x{config.grid_size}, "
          f"K={config.num_embeddings}, D={config.embedding_dim}")
    model.fit(data["train"], initial_epoch=epochs_done, epochs=config.epochs, callbacks=callbacks,
              verbose=fit_verbosity(), shuffle=False)  # the dataset shuffles itself

    val_recon, val_codes = utils.reconstruct(model, data["val_images"])
    val_ssim = curves.history["val_ssim"][-1]
    show = np.linspace(0, len(val_recon) - 1, 8).astype(int)
    utils.plot_image_rows(run_dir / "recon.png", {"validation originals": data["val_images"][show],
                                                  "reconstructions": val_recon[show]},
                          title=f"VQ-VAE reconstructions, mean validation SSIM {val_ssim:.3f}")
    seconds = curves.history["seconds"][-1]
    metrics = {"epochs": config.epochs, "train_seconds": round(seconds, 1), "hardware": hardware.describe(),
               "val_ssim": val_ssim, "val_ssim_floors": floors, "num_embeddings": config.num_embeddings,
               **{f"val_{k}": v for k, v in modules.codebook_usage(val_codes, config.num_embeddings).items()}}
    utils.update_metrics(run_dir, "vqvae", metrics)
    write_progress(run_dir, "vqvae", finished=True)
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


def train_prior(config: Config, run_dir: Path, hardware: Hardware) -> dict:
    """Trains (or, after a crash, continues) the prior of run_dir on its cached codes, checkpointing every epoch."""
    vqvae = utils.load_model(run_dir / "vqvae.keras")
    codes = {split: cached_codes(vqvae, config, run_dir, split) for split in ("train", "validate")}
    utils.save_config(config, run_dir)  # only now: with --stage prior, a data error must leave the run as it was
    epochs_done, _ = stage_state(run_dir, "prior")
    steps_per_epoch = int(np.ceil(len(codes["train"]) / config.prior_batch_size))
    prior = stage_model(run_dir, "prior", epochs_done,
                        lambda dtype, jit: new_prior(config, steps_per_epoch, dtype, jit), hardware)
    if epochs_done:
        print(f"resuming the prior after epoch {epochs_done} of {config.prior_epochs}")
    curves = CurveWriter(run_dir, "prior_history.csv", [
        ("prior_loss.png", {"bits_per_code": "train", "val_bits_per_code": "validation"}, "NLL (bits per code)",
         "PixelCNN prior", None)], history=read_history(run_dir / "prior_history.csv", epochs_done))
    callbacks = [StopOnNonFiniteLoss("prior", "--prior-learning-rate", config.prior_learning_rate, run_dir),
                 BitsPerCode(), curves, Checkpoint(run_dir, "prior")]
    print(f"PixelCNN prior: {prior.count_params():,} parameters, {config.prior_layers} gated layers, receptive "
          f"field {prior.receptive_rows()} rows of the {config.grid_size}x{config.grid_size} grid")
    train_codes, val_codes = codes["train"].astype("int32"), codes["validate"].astype("int32")
    prior.fit(train_codes, train_codes, validation_data=(val_codes, val_codes), batch_size=config.prior_batch_size,
              initial_epoch=epochs_done, epochs=config.prior_epochs, callbacks=callbacks, verbose=fit_verbosity())
    metrics = {"epochs": config.prior_epochs, "train_seconds": round(curves.history["seconds"][-1], 1),
               "hardware": hardware.describe(),
               "val_bits_per_code": curves.history["val_bits_per_code"][-1],
               "train_bits_per_code": curves.history["bits_per_code"][-1],
               "uniform_bits_per_code": float(np.log2(config.num_embeddings))}
    utils.update_metrics(run_dir, "prior", metrics)
    write_progress(run_dir, "prior", finished=True)
    print(f"prior done in {metrics['train_seconds']:.0f} s: validation NLL {metrics['val_bits_per_code']:.3f} "
          "bits/code")
    return metrics


def prior_stage_run(args: argparse.Namespace) -> tuple[Path, Config]:
    """The run folder and config for --stage prior: an existing run with a trained VQ-VAE and no finished prior."""
    if not args.run:
        raise UserError("--stage prior trains the prior of an existing run: pass --run runs/NAME")
    run_dir = Path(args.run)
    config = utils.load_run_config(run_dir)
    if not stage_state(run_dir, "vqvae")[1]:
        raise UserError(f"{run_dir} has no trained VQ-VAE; train it first with `python train.py --stage vqvae` "
                        f"(or finish it with --resume {run_dir})")
    if stage_state(run_dir, "prior")[1]:
        raise UserError(f"{run_dir} already has a trained prior (prior.keras); train a new run, or move prior.keras "
                        f"and the prior entry of {PROGRESS} away first")
    overrides = utils.config_overrides(args)
    fixed = [name for name in overrides if not name.startswith("prior_") and name not in ("data_dir", "seed")]
    if fixed:
        raise UserError(f"--{fixed[0].replace('_', '-')} belongs to the VQ-VAE that {run_dir} already trained; "
                        "with --stage prior only the --prior-* flags, --data-dir and --seed apply")
    if stage_state(run_dir, "prior")[0] and overrides:
        raise UserError(f"the prior of {run_dir} is partly trained; continue it with --resume {run_dir}, "
                        "without changing its settings")
    config = dataclasses.replace(config, **overrides)
    config.validate()
    return run_dir, config


def resumed_run(args: argparse.Namespace) -> tuple[Path, Config, str]:
    """The run folder, config and stages of --resume RUN: settings come from the run, not from flags."""
    run_dir = Path(args.resume)
    config = utils.load_run_config(run_dir)
    overrides = utils.config_overrides(args)
    changed = [name for name in overrides if name != "data_dir"]
    if changed:
        raise UserError(f"--resume continues {run_dir} with the settings in its config.json; drop "
                        f"--{changed[0].replace('_', '-')} (only --data-dir may change, if the data moved)")
    config = dataclasses.replace(config, **overrides)
    return run_dir, config, read_progress(run_dir).get("stages", "all")


def check_writable(folder: Path) -> None:
    """A UserError unless `folder` exists as a writable folder or can be created, checked before any work."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write run folders under {folder} ({existing} is not a writable folder); "
                        "pass --runs-dir PATH to a folder you can write to")


def remove_stale_temporaries(run_dir: Path) -> None:
    """A process killed in the middle of an atomic write leaves its temporary file; the real file is intact."""
    for path in run_dir.glob(f".*{utils.TEMP_MARK}*"):
        path.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> Path:
    hardware = setup_hardware(args)  # first: splitting the CPU into logical devices must precede any TF work
    if args.resume:
        run_dir, config, stages = resumed_run(args)
    elif args.stage == "prior":
        run_dir, config = prior_stage_run(args)
        stages = "prior"
    else:
        config = utils.config_from_args(args)
        config.validate()
        stages = args.stage
        run_dir = Path(config.runs_dir) / utils.new_run_name(config)
        if run_dir.exists():
            same = (run_dir / "config.json").is_file() and utils.load_run_config(run_dir) == config
            if not same:
                raise UserError(f"run folder {run_dir} already exists with other settings; pick another --name, "
                                f"or continue it with --resume {run_dir}")
            # the same command on the same run folder continues that run
    check_writable(run_dir if run_dir.exists() else run_dir.parent)
    check_batch_splits(config.batch_size, "--batch-size", hardware)
    check_batch_splits(config.prior_batch_size, "--prior-batch-size", hardware)
    print(f"hardware: {hardware.describe()}")
    if run_dir.exists():
        remove_stale_temporaries(run_dir)

    vqvae_done = stage_state(run_dir, "vqvae")[1]
    if stages in ("vqvae", "all") and not vqvae_done:
        data = prepare_data(config, args.demo)  # every data error surfaces here, before a run folder exists
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            utils.save_config(config, run_dir)
            utils.write_json(run_dir / PROGRESS, {"stages": stages, **read_progress(run_dir)})
            train_vqvae(config, data, run_dir, hardware)
        except BaseException:
            if created and not (run_dir / "vqvae.keras").exists():  # nothing worth keeping from this command
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        del data  # the images are not needed for the prior, which trains on codes
    elif stages in ("vqvae", "all"):
        print(f"the VQ-VAE of {run_dir} is trained already")
    if stages in ("prior", "all"):
        if stage_state(run_dir, "prior")[1]:
            print(f"the prior of {run_dir} is trained already")
        else:
            train_prior(config, run_dir, hardware)
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
