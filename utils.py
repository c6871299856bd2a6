"""The pieces train.py and predict.py share: the configuration, the run folder, metrics with their trivial floors,
plots, and the scripts' common `main`.

Only numpy is imported here at import time; Keras is imported inside the functions that need it (any backend).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag, bad data). Scripts print it as one line and exit 2."""


def script_main(body, argv: list[str] | None) -> int:
    """Runs a script's body(argv). A UserError becomes one line on stderr ("error: ...") and exit code 2."""
    try:
        body(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


@contextlib.contextmanager
def native_stderr_captured():
    """Collects what is written to the process's stderr (file descriptor 2) inside the block instead of showing it,
    TensorFlow's C++ start-up lines (oneDNN, CUDA probing: "failed call to cuInit" on a machine without a GPU)
    among them. Yields a list that holds the collected text once the block has ended."""
    sys.stderr.flush()
    saved = os.dup(2)
    collected: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield collected
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            collected.append(sink.read().decode(errors="replace"))


# ---------------------------------------------------------------------------------------------------------------
# Configuration: one object, saved as runs/NAME/config.json, from which predict.py rebuilds everything.
# ---------------------------------------------------------------------------------------------------------------


def setting(default, why: str):
    """A Config field; its why-comment is also the help of its --flag."""
    return dataclasses.field(default=default, metadata={"why": why})


@dataclass
class Config:
    """Every setting of a run. The defaults are the OASIS preset (256 px, meant for a GPU); DEMO_PRESET below
    changes some of them for the CPU demo."""

    # data
    data_dir: str = setting("data/oasis", "OASIS folder (keras_png_slices_*), its parent, or train/validate/test "
                                          "folders")
    image_size: int = setting(256, "OASIS slices are 256x256; other sizes are resized on load")
    # VQ-VAE (van den Oord et al. 2017)
    downsample: int = setting(4, "256 px / 4 = 64x64 codes: a 4x4 patch per code keeps sulci sharp (8 blurs them)")
    num_embeddings: int = setting(512, "K, codebook size: the paper's value; enough for tissue x edge patterns")
    embedding_dim: int = setting(64, "D, the size of a code vector")
    hidden_channels: int = setting(128, "channels of the encoder and decoder trunks")
    num_res_blocks: int = setting(2, "residual blocks after the strided convolutions (paper: 2)")
    commitment_cost: float = setting(0.25, "beta of the commitment loss (paper: 0.25)")
    # VQ-VAE training
    batch_size: int = setting(128, "the seed's batch size; fits a 24 GB GPU at 256 px")
    epochs: int = setting(30, "passes over the training split")
    learning_rate: float = setting(2e-4, "Adam's initial rate, decayed by a cosine to 5% of it (paper: 2e-4)")
    seed: int = setting(42, "the one seed: data order, initial weights, codebook restarts, sampling")
    # PixelCNN prior (van den Oord et al. 2016), trained on the VQ-VAE's codes of the training split
    prior_channels: int = setting(128, "width of the gated stacks")
    prior_layers: int = setting(15, "gated blocks; each adds kernel_size // 2 rows of context above a position")
    prior_kernel_size: int = setting(5, "5 doubles the reach of 3 per layer: brain outlines span the whole grid")
    prior_batch_size: int = setting(32, "code grids per step")
    prior_epochs: int = setting(50, "passes over the training split's code grids")
    prior_learning_rate: float = setting(3e-4, "Adam's initial rate, decayed by a cosine to 5% of it")
    # run folder
    runs_dir: str = setting("runs", "where run folders are made")
    name: str = setting("", "the run's folder name under --runs-dir; empty means a timestamp")

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
                raise UserError(f"{flag(field)} must be a positive integer, got {getattr(self, field)}")
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
                raise UserError(f"{flag(field)} must be positive, got {getattr(self, field)}")
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


def flag(field: str) -> str:
    """The command-line flag of a Config field: image_size -> --image-size."""
    return "--" + field.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per Config field; its help is the field's why-comment with the OASIS and demo defaults."""
    group = parser.add_argument_group("settings (saved in the run's config.json)")
    for field in dataclasses.fields(Config):
        demo = f"; --demo: {DEMO_PRESET[field.name]!r}" if field.name in DEMO_PRESET else ""
        group.add_argument(flag(field.name), dest=field.name, type=type(field.default), default=None,
                           metavar=type(field.default).__name__.upper(),
                           help=f"{field.metadata['why']} (default {field.default!r}{demo})".replace("%", "%%"))


def config_overrides(args: argparse.Namespace) -> dict:
    """The Config fields given as flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
            if getattr(args, f.name, None) is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    """Config = the OASIS defaults (or the demo preset with --demo) + any flags given."""
    config = Config(**DEMO_PRESET) if getattr(args, "demo", False) else Config()
    return dataclasses.replace(config, **config_overrides(args))


# ---------------------------------------------------------------------------------------------------------------
# The run folder: the one owner of every file name and every piece of run state
# ---------------------------------------------------------------------------------------------------------------

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


STAGES = ("vqvae", "prior")


class Run:
    """A run folder, runs/NAME. Nothing else in the package spells the name of a file in it.

        config.json         every setting (Config): predict.py rebuilds everything from the folder alone
        progress.json       per stage, epochs done and whether it finished; which stages the run trains
        metrics.json        one section each: vqvae, prior (train.py), reconstruction, samples (predict.py)
        vqvae.keras         stage 1 checkpoint (model and optimizer state), rewritten after every epoch
        history.csv         stage 1 metrics per epoch (figures ssim.png, losses.png, recon.png)
        codes_SPLIT.npy     the train and validation splits as code grids, encoded once for the prior
        prior.keras         stage 2 checkpoint
        prior_history.csv   stage 2 metrics per epoch (figure prior_loss.png)
        *.png, samples/     figures, and predict.py's generated slices
    """

    FILES = {"config": "config.json", "progress": "progress.json", "metrics": "metrics.json"}
    STAGE_FILES = {"vqvae": ("vqvae.keras", "history.csv"), "prior": ("prior.keras", "prior_history.csv")}

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """An existing run folder written by train.py, or a UserError saying what is wrong."""
        run = cls(path)
        if not run.path.is_dir():
            raise UserError(f"run folder {run.path} does not exist; pass an existing runs/NAME")
        if not run._file("config").is_file():
            raise UserError(f"{run.path} has no {run.FILES['config']}, so it is not a run folder written by train.py")
        return run

    @classmethod
    def newest(cls, runs_dir: str | Path = "runs") -> "Run":
        """The run whose VQ-VAE checkpoint was written last."""
        checkpoints = sorted(Path(runs_dir).glob(f"*/{cls.STAGE_FILES['vqvae'][0]}"), key=lambda p: p.stat().st_mtime)
        if not checkpoints:
            raise UserError(f"no run found in {runs_dir}/; train one first with `python train.py --demo` "
                            "or pass --run runs/NAME")
        return cls(checkpoints[-1].parent)

    def _file(self, key: str) -> Path:
        return self.path / self.FILES[key]

    def exists(self) -> bool:
        return self.path.is_dir()

    @contextlib.contextmanager
    def training(self, config: Config, stages: tuple[str, ...]):
        """Around a stage's training. A new run's folder is made here, with its config and the stages it trains;
        if the block fails before the first checkpoint, the folder is removed again: a failed command leaves no
        half-made run behind, and never touches an existing one."""
        new = not self.exists()
        if new:
            self.path.mkdir(parents=True)
            self.write_config(config)
            write_json(self._file("progress"), {"stages": list(stages)})
        try:
            yield
        except BaseException:
            if new and not any(self.stage(name).checkpoint.exists() for name in STAGES):
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    # config -----------------------------------------------------------------------------------------------------
    def read_config(self) -> Config:
        path = self._file("config")
        try:
            return Config.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not valid JSON ({error}); restore it or train a new run") from None

    def write_config(self, config: Config) -> None:
        write_json(self._file("config"), dataclasses.asdict(config))

    # progress ---------------------------------------------------------------------------------------------------
    def _progress(self) -> dict:
        path = self._file("progress")
        return json.loads(path.read_text()) if path.is_file() else {}

    def _update_progress(self, stage: str, **values) -> None:
        progress = self._progress()
        progress[stage] = {**progress.get(stage, {}), **values}
        write_json(self._file("progress"), progress)

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages the run was started to train (a --resume without --stage trains those)."""
        stages = self._progress().get("stages", list(STAGES))
        return STAGES if stages == "all" else tuple([stages] if isinstance(stages, str) else stages)

    def stage(self, name: str) -> "Stage":
        return Stage(self, name)

    # metrics ----------------------------------------------------------------------------------------------------
    def read_metrics(self) -> dict:
        path = self._file("metrics")
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_metrics(self, section: str, values: dict) -> None:
        """Replaces one section of metrics.json, keeping the others."""
        write_json(self._file("metrics"), {**self.read_metrics(), section: values})

    # code grids -------------------------------------------------------------------------------------------------
    def _codes_file(self, split: str) -> Path:
        return self.path / f"codes_{split}.npy"

    def read_codes(self, split: str) -> np.ndarray | None:
        """The cached code grids of a split, or None when they have not been encoded yet."""
        path = self._codes_file(split)
        return np.load(path) if path.is_file() else None

    def write_codes(self, split: str, codes: np.ndarray) -> None:
        atomic_write(self._codes_file(split), lambda tmp: np.save(tmp, codes))

    # figures and samples ----------------------------------------------------------------------------------------
    def figure(self, name: str) -> Path:
        """Where the figure `name` (ssim, losses, recon, prior_loss, ssim_hist, recon_test, samples) goes."""
        return self.path / f"{name}.png"

    def write_samples(self, images: np.ndarray) -> Path:
        """Replaces samples/ with one 8-bit PNG per image; returns the folder."""
        folder = self.path / "samples"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for i, image in enumerate(images):
            save_png(folder / f"sample_{i:03d}.png", image)
        return folder

    def remove_stale_temporaries(self) -> None:
        """A process killed in the middle of an atomic write leaves its temporary file; the real file is intact."""
        for path in self.path.glob(f".*{TEMP_MARK}*"):
            path.unlink(missing_ok=True)


class Stage:
    """One training stage of a run ("vqvae" or "prior"): its checkpoint, progress and history.

    After every epoch, save_checkpoint writes the model (atomically), then the epoch count to progress.json, so
    whenever the process dies the checkpoint holds at least the epochs progress.json counts.
    """

    def __init__(self, run: Run, name: str):
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; the stages are {STAGES}")
        self.run, self.name = run, name
        model_file, history_file = run.STAGE_FILES[name]
        self.checkpoint, self.history_file = run.path / model_file, run.path / history_file

    def _state(self) -> dict:
        return self.run._progress().get(self.name, {})

    @property
    def epochs_done(self) -> int:
        return self._state().get("epochs_done", 0)

    @property
    def finished(self) -> bool:
        return self._state().get("finished", False)

    @property
    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file()

    def save_checkpoint(self, model, epochs_done: int) -> None:
        atomic_write(self.checkpoint, model.save)  # the temporary name keeps the .keras suffix save() requires
        self.run._update_progress(self.name, epochs_done=epochs_done)

    def mark_finished(self) -> None:
        self.run._update_progress(self.name, finished=True)

    def discard(self) -> None:
        """Forgets the stage: its checkpoint, history and progress (to train it again from scratch)."""
        self.checkpoint.unlink(missing_ok=True)
        self.history_file.unlink(missing_ok=True)
        progress = self.run._progress()
        progress.pop(self.name, None)
        write_json(self.run._file("progress"), progress)

    def load_model(self, float32: bool = False):
        """The stage's checkpoint as a Keras model, with a clear error if it is missing or unreadable. float32=True
        gives a full-precision copy of a model trained with mixed precision (for evaluation and sampling)."""
        import keras

        import modules

        if not self.checkpoint.is_file():
            raise UserError(f"{self.checkpoint} does not exist; train that stage first (python train.py, see --help)")
        try:
            model = keras.saving.load_model(self.checkpoint)
        except Exception as error:  # a truncated or foreign file
            raise UserError(f"cannot load {self.checkpoint} ({type(error).__name__}); the file is damaged or from "
                            "another tool, retrain that stage") from None
        return modules.full_precision(model) if float32 else model

    def read_history(self) -> dict:
        """The history of the completed epochs as {column: [values]} (a resumed stage continues it)."""
        epochs = self.epochs_done
        if epochs == 0 or not self.history_file.is_file():
            return {}
        with open(self.history_file, newline="") as f:
            rows = list(csv.DictReader(f))[:epochs]
        return {column: [float(row[column]) for row in rows] for column in rows[0] if column != "epoch"}

    def write_history(self, history: dict) -> None:
        columns = list(history)

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["epoch", *columns])
                for i in range(len(history[columns[0]])):
                    writer.writerow([i + 1, *(f"{history[c][i]:.6g}" for c in columns)])

        atomic_write(self.history_file, write)


def new_run_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------------------------------
# Metrics, each read beside the trivial floors it must beat
# ---------------------------------------------------------------------------------------------------------------


def batched(fn, array, batch_size: int = 64) -> np.ndarray:
    """fn applied to consecutive batches of `array` (a model call, say), the outputs joined as one NumPy array."""
    return np.concatenate([np.asarray(fn(array[i:i + batch_size])) for i in range(0, len(array), batch_size)])


def reconstruct(vqvae, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (reconstructions clipped to [0, 1], code grids), in batches."""
    codes = batched(vqvae.encode, images)
    return batched(vqvae.decode, codes), codes


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    coords = np.arange(size) - (size - 1) / 2
    g = np.exp(-coords**2 / (2 * sigma**2))
    return (np.outer(g, g) / np.outer(g, g).sum()).astype("float32")[:, :, None, None]  # (size, size, 1, 1)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) of two (N, H, W, 1) batches in [0, 1], computed as tf.image.ssim does it:
    an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, valid positions only; in keras.ops, any backend."""
    from keras import ops

    window, c1, c2 = _gaussian_window(), 0.01**2, 0.03**2
    scores = []
    for i in range(0, len(a), 256):
        x, y = (ops.convert_to_tensor(np.asarray(v[i:i + 256], "float32")) for v in (a, b))
        local = lambda t: ops.conv(t, window, padding="valid")  # noqa: E731  Gaussian-weighted local mean
        mean_x, mean_y = local(x), local(y)
        luminance = (2 * mean_x * mean_y + c1) / (mean_x**2 + mean_y**2 + c1)
        structure = ((2 * (local(x * y) - mean_x * mean_y) + c2)
                     / (local(x**2 + y**2) - (mean_x**2 + mean_y**2) + c2))  # contrast x structure
        scores.append(np.asarray(ops.mean(luminance * structure, axis=(1, 2, 3))))
    return np.concatenate(scores)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image peak signal-to-noise ratio in dB for images in [0, 1]."""
    mse = np.mean((np.asarray(a, "float64") - np.asarray(b, "float64")) ** 2, axis=(1, 2, 3))
    return (10 * np.log10(1.0 / np.maximum(mse, 1e-20))).astype("float32")


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
    from keras import ops

    size = images.shape[1]
    small = ops.image.resize(images, (size // factor, size // factor), interpolation="bilinear", antialias=True)
    return np.clip(np.asarray(ops.image.resize(small, (size, size), interpolation="bilinear")), 0.0, 1.0)


def floor_name(downsample: int) -> str:
    return f"bilinear_x{downsample}"


def floor_label(name: str) -> str:
    """How plots and tables call a floor: bilinear_x4 -> 'bilinear x4 down/up', all_black -> 'all-black'."""
    return "all-black" if name == "all_black" else f"bilinear x{name.removeprefix('bilinear_x')} down/up"


def floor_images(images: np.ndarray, downsample: int) -> dict:
    """The trivial reconstructions a VQ-VAE's must be read against, by their metric names."""
    return {floor_name(downsample): bilinear_baseline(images, downsample), "all_black": np.zeros_like(images)}


def reconstruction_scores(real: np.ndarray, fake: np.ndarray) -> dict:
    """SSIM, SSIM on the brain's bounding box and PSNR of reconstructions, each as mean / median / min."""
    return {"ssim": summarize(ssim(real, fake)), "ssim_brain_crop": summarize(ssim_brain_crop(real, fake)),
            "psnr": summarize(psnr(real, fake))}


def codebook_usage(indices, num_embeddings: int) -> dict:
    """Perplexity (exp of the entropy of code frequencies: K when all codes are used equally, 1 when one code
    takes everything) and the number of codes used at least once, over an array of indices."""
    counts = np.bincount(np.asarray(indices, "int64").reshape(-1), minlength=num_embeddings)
    probs = counts / max(counts.sum(), 1)
    entropy = -np.sum(probs * np.log(np.maximum(probs, 1e-12)))
    return {"perplexity": float(np.exp(entropy)), "codes_used": int(np.sum(counts > 0))}


def bits_per_code(prior, codes: np.ndarray, batch_size: int = 64) -> float:
    """Mean negative log-likelihood of code grids under the prior, in bits per code."""
    total = 0.0
    for start in range(0, len(codes), batch_size):
        batch = np.asarray(codes[start:start + batch_size], "int32")
        logits = np.asarray(prior(batch), "float64")  # (B, H, W, K)
        top = logits.max(-1, keepdims=True)
        log_norm = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
        total += float(np.sum(log_norm - np.take_along_axis(logits, batch[..., None], -1)[..., 0]))
    return total / codes.size / np.log(2)


def _thumbnails(images: np.ndarray, size: int = 32) -> np.ndarray:
    """(N, H, W, 1) -> (N, size * size) area-averaged thumbnails."""
    n, h, w, _ = images.shape
    if h % size == 0 and w % size == 0:
        return images.reshape(n, size, h // size, size, w // size).mean(axis=(2, 4)).reshape(n, -1)
    from keras import ops

    small = ops.image.resize(images, (size, size), interpolation="bilinear", antialias=True)
    return np.asarray(small).reshape(n, -1)


def nearest_ssim(queries: np.ndarray, pool: np.ndarray, shortlist: int = 32) -> np.ndarray:
    """For each query image, the highest SSIM against any image of `pool` (both (N, H, W, 1) in [0, 1]).

    Exact SSIM against every pool image costs too much on a CPU (16 x 9,664 full-size SSIMs on OASIS), so the
    `shortlist` pool images nearest in L2 on 32x32 thumbnails are scored with SSIM and the best is kept.
    """
    q, p = _thumbnails(queries), _thumbnails(pool)
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
    """Line plot of history columns per epoch; `series` maps column name -> label, `floors` metric name -> y."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in series.items():
        if column in history:
            epochs = np.arange(1, len(history[column]) + 1)
            ax.plot(epochs, history[column], marker="o", markersize=3, label=label)
    for name, y in (floors or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="gray")
        ax.annotate(floor_label(name), (1, y), textcoords="offset points", xytext=(2, 3), fontsize=8, color="gray")
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
