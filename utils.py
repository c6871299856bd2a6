"""Small pieces shared by train.py and predict.py: the run configuration, run folders, atomic writes, SSIM
metrics with their trivial baselines, and plots.

Nothing here builds a model or reads image files (that is modules.py and dataset.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag, bad data). Scripts print it as one line and exit 2."""


# ---------------------------------------------------------------------------------------------------------------
# Configuration: one object, saved as runs/NAME/config.json, from which predict.py rebuilds everything.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # data
    data_dir: str = "data/oasis"  # OASIS folder (keras_png_slices_*), its parent, or train/validate/test folders
    image_size: int = 256  # OASIS slices are 256x256; smaller sizes are resized on load
    # VQ-VAE (van den Oord et al. 2017)
    downsample: int = 4  # 256 px / 4 = 64x64 codes: a 4x4 patch per code keeps sulci sharp (8 blurs them)
    num_embeddings: int = 512  # K, codebook size: the paper's value; enough for tissue x edge patterns
    embedding_dim: int = 64  # D, code vector size
    hidden_channels: int = 128  # channels of the encoder/decoder trunk
    num_res_blocks: int = 2  # residual blocks after the strided convolutions (paper: 2)
    commitment_cost: float = 0.25  # beta of the commitment loss (paper: 0.25)
    # VQ-VAE training
    batch_size: int = 128  # the seed's batch size; fits a 24 GB GPU at 256 px
    epochs: int = 30
    learning_rate: float = 2e-4  # Adam, as in the paper
    seed: int = 42  # the one seed: data order, initial weights, sampling
    # PixelCNN prior (van den Oord et al. 2016), trained on the VQ-VAE's codes of the training split
    prior_channels: int = 128  # width of the gated stacks
    prior_layers: int = 15  # gated blocks; each adds kernel_size // 2 rows of context above a position
    prior_kernel_size: int = 5  # 5 doubles the reach of 3 per layer: brain outlines span the whole grid
    prior_batch_size: int = 32
    prior_epochs: int = 50
    prior_learning_rate: float = 3e-4
    # run folder
    runs_dir: str = "runs"
    name: str = ""  # run name; empty means a timestamp

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"config has unknown fields {unknown}; it was written by another version of this tool")
        return cls(**values)

    def validate(self) -> None:
        """Raises UserError for settings that cannot train; called before any folder is created."""
        for field in ("image_size", "downsample", "num_embeddings", "embedding_dim", "hidden_channels",
                      "batch_size", "epochs", "prior_channels", "prior_layers", "prior_batch_size", "prior_epochs"):
            if getattr(self, field) <= 0:
                raise UserError(f"--{field.replace('_', '-')} must be a positive integer, got {getattr(self, field)}")
        if self.num_res_blocks < 0:
            raise UserError(f"--num-res-blocks must be 0 or more, got {self.num_res_blocks}")
        if self.downsample & (self.downsample - 1):
            raise UserError(f"--downsample must be a power of two (2, 4, 8, ...), got {self.downsample}")
        if self.image_size % self.downsample:
            raise UserError(f"--image-size {self.image_size} is not divisible by --downsample {self.downsample}; "
                            f"pick a multiple, e.g. {self.image_size // self.downsample * self.downsample or self.downsample}")
        if self.image_size // self.downsample < 2:
            raise UserError(f"--image-size {self.image_size} / --downsample {self.downsample} leaves a code grid "
                            "smaller than 2x2; use a larger image or a smaller factor")
        for field in ("learning_rate", "prior_learning_rate"):
            if not getattr(self, field) > 0:
                raise UserError(f"--{field.replace('_', '-')} must be positive, got {getattr(self, field)}")
        if self.prior_kernel_size < 3 or self.prior_kernel_size % 2 == 0:
            raise UserError(f"--prior-kernel-size must be odd and at least 3, got {self.prior_kernel_size}")
        if not self.commitment_cost >= 0:
            raise UserError(f"--commitment-cost must be 0 or more, got {self.commitment_cost}")

    def vqvae_kwargs(self) -> dict:
        """The arguments of modules.VQVAE, taken from this config."""
        return dict(downsample=self.downsample, num_embeddings=self.num_embeddings,
                    embedding_dim=self.embedding_dim, hidden_channels=self.hidden_channels,
                    num_res_blocks=self.num_res_blocks, commitment_cost=self.commitment_cost)

    def prior_kwargs(self) -> dict:
        """The arguments of modules.PixelCNNPrior, taken from this config."""
        return dict(num_embeddings=self.num_embeddings, grid_shape=(self.grid_size, self.grid_size),
                    channels=self.prior_channels, num_layers=self.prior_layers, kernel_size=self.prior_kernel_size)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample


# The CPU demo: 128 px slices of the built-in demo set and small models, both stages in minutes on 2 cores.
DEMO_PRESET = dict(
    data_dir="data/demo",
    image_size=128,  # half the OASIS size on each side: 4x fewer pixels, trains on a laptop CPU
    downsample=4,  # 32x32 codes, as at OASIS scale each code covers a 4x4 patch
    num_embeddings=256,
    embedding_dim=32,
    hidden_channels=64,
    num_res_blocks=2,
    batch_size=32,
    epochs=25,
    learning_rate=2e-3,  # small model, few steps: a larger step size converges within the CPU budget
    prior_channels=48,
    prior_layers=10,
    prior_kernel_size=3,
    prior_epochs=8,
    prior_learning_rate=1e-3,
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per Config field, with the OASIS default shown in --help."""
    for field in dataclasses.fields(Config):
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=type(field.default),
                            default=None, help=f"(default {field.default!r}; --demo changes some)")


def config_overrides(args: argparse.Namespace) -> dict:
    """The Config fields given as flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
            if getattr(args, f.name, None) is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    """Config = the OASIS defaults (or the demo preset with --demo) + any flags given."""
    config = Config(**DEMO_PRESET) if getattr(args, "demo", False) else Config()
    return dataclasses.replace(config, **config_overrides(args))


# ---------------------------------------------------------------------------------------------------------------
# Run folders and atomic files
# ---------------------------------------------------------------------------------------------------------------


def new_run_name(config: Config) -> str:
    return config.name or time.strftime("%Y%m%d-%H%M%S")


def newest_run(runs_dir: str | Path = "runs") -> Path:
    """The run folder whose trained VQ-VAE was written last."""
    runs = sorted(Path(runs_dir).glob("*/vqvae.keras"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserError(f"no run found in {runs_dir}/; train one first with `python train.py --demo` "
                        "or pass --run runs/NAME")
    return runs[-1].parent


def load_run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass an existing runs/NAME")
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no config.json, so it is not a run folder written by train.py")
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); restore it or train a new run") from None


def load_model(path: Path, float32: bool = False):
    """A .keras file of this project, with a clear error if it is missing or unreadable. float32=True gives a
    full-precision copy of a model trained with mixed precision (for evaluation and sampling)."""
    import keras

    import modules  # noqa: F401  registers the custom classes for load_model

    if not path.is_file():
        raise UserError(f"{path} does not exist; train that stage first (python train.py, see --help)")
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # a truncated or foreign file
        raise UserError(f"cannot load {path} ({type(error).__name__}); the file is damaged or from another "
                        "tool, retrain that stage") from None
    return full_precision(model) if float32 else model


def full_precision(model):
    """The model itself if it computes in float32, else a float32 copy with the same weights."""
    if model.dtype_policy.name == "float32":
        return model
    copy = type(model).from_config({**model.get_config(), "dtype": "float32"})
    copy.build_from_config(model.get_build_config())
    copy.set_weights(model.get_weights())
    return copy


TEMP_MARK = ".tmp-"  # in the names of atomic_write's temporary files: .NAME.tmp-XXXX.SUFFIX


def atomic_write(path: str | Path, write) -> None:
    """Calls write(tmp_path), then renames tmp_path onto path: readers see the old file or the new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}{TEMP_MARK}", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=_json_default) + "\n"))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def save_config(config: Config, run_dir: Path) -> None:
    write_json(run_dir / "config.json", dataclasses.asdict(config))


def update_metrics(run_dir: Path, section: str, values: dict) -> None:
    """Replaces one section of run_dir/metrics.json, keeping the others."""
    path = Path(run_dir) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics[section] = values
    write_json(path, metrics)


# ---------------------------------------------------------------------------------------------------------------
# Metrics: SSIM and PSNR with the trivial floors they must be read against
# ---------------------------------------------------------------------------------------------------------------


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM of two (N, H, W, 1) batches in [0, 1] (tf.image.ssim, 11x11 Gaussian window)."""
    import tensorflow as tf

    return np.concatenate([tf.image.ssim(tf.constant(a[i:i + 256]), tf.constant(b[i:i + 256]), max_val=1.0).numpy()
                           for i in range(0, len(a), 256)])


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    return tf.image.psnr(tf.constant(a), tf.constant(b), max_val=1.0).numpy()


BRAIN_THRESHOLD = 0.02  # intensity above which a pixel counts as brain (the background of skull-stripped slices is 0)


def brain_fraction(images: np.ndarray) -> np.ndarray:
    """Per image, the fraction of pixels that are brain: a sample's SSIM can be high just by being mostly black."""
    return (images[..., 0] > BRAIN_THRESHOLD).mean(axis=(1, 2))


def brain_box(image: np.ndarray, threshold: float = BRAIN_THRESHOLD) -> tuple[slice, slice]:
    """Bounding box of the non-background pixels of one (H, W, 1) image, at least 11 px (the SSIM window)."""
    rows, cols = np.nonzero(image[..., 0] > threshold)
    if len(rows) == 0:
        return slice(None), slice(None)

    def span(lo, hi, size):
        lo, hi = max(0, min(lo, size - 11)), max(hi + 1, lo + 11)
        return slice(lo, min(hi, size))

    return span(rows.min(), rows.max(), image.shape[0]), span(cols.min(), cols.max(), image.shape[1])


def ssim_brain_crop(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """SSIM on the crop to each real image's brain bounding box, so the black background cannot inflate it."""
    scores = []
    for r, f in zip(real, fake):
        box = brain_box(r)
        scores.append(ssim(r[None][(slice(None), *box)], f[None][(slice(None), *box)])[0])
    return np.array(scores)


def bilinear_baseline(images: np.ndarray, factor: int) -> np.ndarray:
    """Shrink by `factor` (antialiased) and scale back up (bilinear): what the code grid's size alone gives."""
    import tensorflow as tf

    size = images.shape[1]
    small = tf.image.resize(images, (size // factor, size // factor), method="bilinear", antialias=True)
    return np.clip(tf.image.resize(small, (size, size), method="bilinear").numpy(), 0.0, 1.0)


def reconstruct(model, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (reconstructions clipped to [0, 1], code indices), in batches."""
    recons, codes = [], []
    for start in range(0, len(images), batch_size):
        indices = model.encode(images[start:start + batch_size])
        recons.append(np.asarray(model.decode(indices)))
        codes.append(np.asarray(indices))
    return np.concatenate(recons), np.concatenate(codes)


def nearest_ssim(queries: np.ndarray, pool: np.ndarray, shortlist: int = 32) -> np.ndarray:
    """For each query image, the highest SSIM against any image of `pool` (both (N, H, W, 1) in [0, 1]).

    Exact SSIM against every pool image costs too much on a CPU (16 x 9,664 full-size SSIMs on OASIS), so the
    `shortlist` pool images nearest in L2 on 32x32 thumbnails are scored with tf.image.ssim and the best is kept.
    """
    import tensorflow as tf

    def thumbs(images):
        return tf.reshape(tf.image.resize(images, (32, 32), method="area"), (len(images), -1)).numpy()

    q, p = thumbs(queries), thumbs(pool)
    distances = (q**2).sum(1)[:, None] - 2 * q @ p.T + (p**2).sum(1)[None, :]  # (Q, P)
    k = min(shortlist, len(pool))
    candidates = np.argpartition(distances, k - 1, axis=1)[:, :k]  # (Q, k)
    scores = ssim(np.repeat(queries, k, axis=0), pool[candidates.reshape(-1)])
    return scores.reshape(len(queries), k).max(axis=1)


def summarize(values: np.ndarray) -> dict:
    return dict(mean=float(np.mean(values)), median=float(np.median(values)), min=float(np.min(values)))


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend: no screen needed)
# ---------------------------------------------------------------------------------------------------------------


def save_png(path: Path, image: np.ndarray) -> None:
    """One (H, W, 1) image in [0, 1] as an 8-bit grayscale PNG, like the OASIS slices."""
    from PIL import Image

    pixels = (np.clip(image[..., 0], 0, 1) * 255).round().astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
    _pyplot().close(fig)


def plot_curves(path: Path, history: dict, series: dict, ylabel: str, title: str, floors: dict | None = None) -> None:
    """Line plot of history columns per epoch; `series` maps column name -> label, `floors` label -> y."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in series.items():
        if column in history:
            epochs = np.arange(1, len(history[column]) + 1)
            ax.plot(epochs, history[column], marker="o", markersize=3, label=label)
    for label, y in (floors or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="gray")
        ax.annotate(label, (1, y), textcoords="offset points", xytext=(2, 3), fontsize=8, color="gray")
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_image_rows(path: Path, rows: dict, title: str = "") -> None:
    """A grid of grayscale images: each item of `rows` is (label, images (N, H, W, 1))."""
    plt = _pyplot()
    n_cols = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.6 * n_cols, 1.7 * len(rows)), squeeze=False)
    for axes_row, (label, images) in zip(axes, rows.items()):
        for col, ax in enumerate(axes_row):
            ax.axis("off")
            if col < len(images):
                ax.imshow(images[col][..., 0], cmap="gray", vmin=0, vmax=1)
        axes_row[0].set_title(label, fontsize=9, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def plot_histogram(path: Path, values: dict, xlabel: str, title: str) -> None:
    """Overlaid histograms, one per item of `values` (label -> array)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    lo = min(float(np.min(v)) for v in values.values())
    bins = np.linspace(min(lo, 0.5), 1.0, 41)
    for label, v in values.items():
        ax.hist(v, bins=bins, alpha=0.6, label=f"{label} (mean {np.mean(v):.3f})")
    ax.set(xlabel=xlabel, ylabel="images", title=title)
    ax.legend(fontsize=8)
    save_figure(fig, path)
