"""The run's state: every setting (Config, with the OASIS defaults and the demo preset) and the run folder that
holds it (Run, with a Stage per model), the one owner of every file name and every piece of run state.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

import modules
from utils import BRAIN_THRESHOLD, TEMP_MARK, UserError, atomic_write, save_png, signals_deferred, write_json

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
    background: float = setting(BRAIN_THRESHOLD, "decoded intensities below this become exactly 0, as the "
                                                 "background of skull-stripped slices is; 0: off")
    # VQ-VAE training
    batch_size: int = setting(128, "the seed's batch size; fits a 24 GB GPU at 256 px")
    epochs: int = setting(30, "passes over the training split")
    sharpen_epochs: int = setting(0, "the last N of --epochs train the decoder alone (codes frozen) with MSE + "
                                     "--spectral-loss: sharper reconstructions, the same codes; 0: off")
    spectral_loss: float = setting(0.0, "weight of the log-FFT-amplitude term (modules.SpectralMSE) in the "
                                        "sharpening epochs")
    learning_rate: float = setting(2e-4, "Adam's initial rate, decayed by a cosine to 5% of it (paper: 2e-4)")
    seed: int = setting(42, "the one seed: data order, initial weights, codebook restarts, sampling")
    # PixelCNN prior (van den Oord et al. 2016), trained on the VQ-VAE's codes of the training split
    prior_channels: int = setting(128, "width of the gated stacks")
    prior_layers: int = setting(15, "gated blocks; each adds kernel_size // 2 rows of context above a position")
    prior_kernel_size: int = setting(5, "5 doubles the reach of 3 per layer: brain outlines span the whole grid")
    prior_attention_layers: int = setting(0, "causal self-attention layers over the whole code grid after the "
                                             "gated stack (PixelSNAIL-style): each code sees every code before it, "
                                             "not just the rows its convolutions reach")
    prior_batch_size: int = setting(32, "code grids per step")
    prior_epochs: int = setting(50, "passes over the training split's code grids")
    prior_learning_rate: float = setting(3e-4, "Adam's initial rate, decayed by a cosine to 5% of it")
    prior_position_frequencies: int = setting(8, "conditions the prior on the slice's depth (from names like "
                                                 "case_001_slice_12.nii.png) through sin/cos features of this many "
                                                 "frequencies; 0: an unconditional prior")
    prior_condition_dropout: float = setting(0.0, "share of training grids whose depth is hidden from the prior, so "
                                                   "that predict.py --guidance can sample with classifier-free "
                                                   "guidance (0: off; the papers use about 0.1)")
    prior_layout_levels: int = setting(8, "L >= 2: a two-level prior that first samples a coarse layout (each 2x2 "
                                          "codes' mean decoded intensity in L bins) with a PixelCNN of its own, then "
                                          "the codes given it, as the only prior that drew anatomy did (a large one, "
                                          "on a GPU; docs/experiments.md); 0: one prior over the codes")
    # tissue segmenter (the tissue report's reader), trained where the data has segmentations (keras_png_slices_seg_*)
    segmenter_channels: int = setting(16, "channels of the U-Net's first level (x2, x4 below it)")
    segmenter_epochs: int = setting(6, "passes over the training split's slices and their tissue labels")
    segmenter_learning_rate: float = setting(3e-3, "Adam's initial rate, decayed by a cosine to 5% of it")
    prior_augment: int = setting(2, "S: the prior also learns the training slices mirrored left-right, and every grid "
                                    "shifted by -S, 0 or +S codes (even; 0: no augmentation): on the demo's codes a "
                                    "large prior then drew anatomy without copying training slices (docs/experiments.md)")
    # run folder
    runs_dir: str = setting("runs", "where run folders are made")
    name: str = setting("", "the run's folder name under --runs-dir; empty means a timestamp")

    # What a config.json written before a setting existed meant by its absence, where that differs from the default.
    BEFORE = {"prior_augment": 0, "prior_layout_levels": 0}

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        values = {**cls.BEFORE, **values}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"config has unknown fields {unknown}; it was written by another version of this tool")
        for field in dataclasses.fields(cls):
            value, kind = values.get(field.name, field.default), type(field.default)
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise UserError(f'"{field.name}" is {value!r}, where a{"n" * (kind is int)} {kind.__name__} belongs')
        return cls(**values)

    def validate(self) -> None:
        """Raises UserError for settings that cannot train; called before any folder is created."""
        for field in ("image_size", "downsample", "num_embeddings", "embedding_dim", "hidden_channels",
                      "batch_size", "epochs", "prior_channels", "prior_layers", "prior_batch_size", "prior_epochs",
                      "segmenter_channels", "segmenter_epochs"):
            if getattr(self, field) <= 0:
                raise UserError(f"{flag(field)} must be a positive integer, got {getattr(self, field)}")
        if self.num_res_blocks < 0:
            raise UserError(f"--num-res-blocks must be 0 or more, got {self.num_res_blocks}")
        if self.downsample & (self.downsample - 1):
            raise UserError(f"--downsample must be a power of two (2, 4, 8, ...), got {self.downsample}")
        if self.image_size % self.downsample:
            raise UserError(f"--image-size {self.image_size} is not divisible by --downsample {self.downsample}; "
                            f"pick a multiple, e.g. {max(self.image_size // self.downsample, 1) * self.downsample}")
        if self.image_size // self.downsample < 2:
            raise UserError(f"--image-size {self.image_size} / --downsample {self.downsample} leaves a code grid "
                            "smaller than 2x2; use a larger image or a smaller factor")
        for field in ("learning_rate", "prior_learning_rate", "segmenter_learning_rate"):
            if not getattr(self, field) > 0:
                raise UserError(f"{flag(field)} must be positive, got {getattr(self, field)}")
        if self.prior_kernel_size < 3 or self.prior_kernel_size % 2 == 0:
            raise UserError(f"--prior-kernel-size must be odd and at least 3, got {self.prior_kernel_size}")
        if self.prior_attention_layers < 0:
            raise UserError(f"--prior-attention-layers must be 0 or more, got {self.prior_attention_layers}")
        if self.prior_layout_levels < 0 or self.prior_layout_levels == 1:
            raise UserError(f"--prior-layout-levels must be 0 (one level) or at least 2, got "
                            f"{self.prior_layout_levels}")
        if self.prior_layout_levels and self.grid_size % 2:
            raise UserError(f"--prior-layout-levels needs an even code grid (a layout cell is 2x2 codes); the grid is "
                            f"{self.grid_size}x{self.grid_size}: change --image-size or --downsample")
        if self.prior_augment < 0 or self.prior_augment % 2 or self.prior_augment >= self.grid_size:
            raise UserError(f"--prior-augment must be an even number of codes below the {self.grid_size}-code grid "
                            f"(0: off), got {self.prior_augment}")
        if not 0 <= self.prior_condition_dropout < 1:
            raise UserError(f"--prior-condition-dropout must be at least 0 and below 1, got "
                            f"{self.prior_condition_dropout}")
        if self.prior_position_frequencies < 0:
            raise UserError(f"--prior-position-frequencies must be 0 or more, got {self.prior_position_frequencies}")
        if not 0 <= self.background < 1:
            raise UserError(f"--background must be at least 0 and below 1, got {self.background}")
        if not self.commitment_cost >= 0:
            raise UserError(f"--commitment-cost must be 0 or more, got {self.commitment_cost}")
        if not self.spectral_loss >= 0:
            raise UserError(f"--spectral-loss must be 0 or more, got {self.spectral_loss}")
        if not 0 <= self.sharpen_epochs < self.epochs:
            raise UserError(f"--sharpen-epochs must be 0 or more and below --epochs ({self.epochs}), got "
                            f"{self.sharpen_epochs}: the epochs before it train the whole VQ-VAE")

    def vqvae_kwargs(self) -> dict:
        """The arguments of modules.VQVAE, taken from this config."""
        return dict(downsample=self.downsample, num_embeddings=self.num_embeddings,
                    embedding_dim=self.embedding_dim, hidden_channels=self.hidden_channels,
                    num_res_blocks=self.num_res_blocks, commitment_cost=self.commitment_cost,
                    background=self.background)

    def prior_kwargs(self) -> dict:
        """The arguments of modules.PixelCNNPrior, taken from this config."""
        return dict(num_embeddings=self.num_embeddings, grid_shape=(self.grid_size, self.grid_size),
                    channels=self.prior_channels, num_layers=self.prior_layers, kernel_size=self.prior_kernel_size,
                    num_conditions=2 * self.prior_position_frequencies,
                    attention_layers=self.prior_attention_layers, layout_levels=self.prior_layout_levels,
                    condition_dropout=self.prior_condition_dropout if self.prior_position_frequencies else 0.0)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def whole_epochs(self) -> int:
        """The epochs that train the whole VQ-VAE, before the decoder's sharpening epochs (the learning rate's
        cosine spans these)."""
        return self.epochs - self.sharpen_epochs


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
    epochs=29,  # 25 that train the whole VQ-VAE (test SSIM 0.956), then 4 that sharpen its decoder:
    sharpen_epochs=4,  # its reconstructions, judged against real slices, 0.760 -> 0.585 (real vs real 0.549) at
    spectral_loss=0.1,  # SSIM 0.954 for 52 s; 21 + 4: 0.676 at SSIM 0.950, 23 + 2: 0.704 (docs/experiments.md)
    learning_rate=2e-3,  # small model, few steps: a larger step size converges within the CPU budget
    prior_channels=32,  # 32 channels, 6 layers at 2e-3: samples told from real 58% of the time (3 draws), test NLL
    prior_layers=6,  # 2.67-2.75 bits/code, in 0.35x the step time of 48 channels, 10 layers at 1e-3 (55%, 2.74)
    prior_kernel_size=3,
    prior_epochs=12,  # at 1e-2, 12 epochs reach validation NLL 2.49, which 2e-3 needed 32 epochs for
    prior_learning_rate=1e-2,  # 16 epochs at 2e-3 / 4e-3 / 6e-3 / 1e-2: validation NLL 2.70, 2.54, 2.48, 2.45 (and
    # 1e-3 below 2e-3, docs/experiments.md): a small prior trained for minutes needs the large step
    prior_layout_levels=8,  # two levels: a 16x16 layout first, then the codes given it (one level: NLL 2.89)
    prior_augment=0,  # flips + shifts did not help the small prior: NLL 2.486 against 2.488 at 1e-2 (2.72 at 2e-3)
    segmenter_channels=8,  # 8-16-32, 8 epochs at 5e-3: 83 s on 2 cores, test Dice CSF 0.65, gray 0.85, white 0.86
    segmenter_epochs=8,  # (3 epochs at 3e-3, unweighted: CSF never called, Dice 0)
    segmenter_learning_rate=5e-3,
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
# The run folder
# ---------------------------------------------------------------------------------------------------------------

STAGES = ("vqvae", "prior", "segmenter")  # the segmenter learns from the data alone, not from the VQ-VAE


class Run:
    """A run folder, runs/NAME. Nothing else in the package spells the name of a file in it.

        config.json         every setting (Config): predict.py rebuilds everything from the folder alone
        progress.json       per stage, epochs done and whether it finished; which stages the run trains
        metrics.json        one section each: vqvae, prior (train.py), reconstruction, samples (predict.py)
        vqvae.keras         stage 1 checkpoint (model and optimizer state), rewritten after every epoch
        history.csv         stage 1 metrics per epoch (figures ssim.png, losses.png, recon.png)
        codes_SPLIT.npz     the train and validation splits as code grids (and slice positions), encoded once;
                            codes_train_flipped.npz: the training slices mirrored (--prior-augment)
        prior.keras         stage 2 checkpoint
        prior_history.csv   stage 2 metrics per epoch (figure prior_loss.png)
        segmenter.keras     stage 3, the tissue segmenter of predict.py's tissue report (data with segmentations)
        segmenter_history.csv
        *.png, samples/     figures, and predict.py's generated slices

    read_only: a Run that reads the folder and writes nothing there (every write below is skipped): the view of the
    workers other than the chief in a training across several machines (cluster.py).
    """

    FILES = {"config": "config.json", "progress": "progress.json", "metrics": "metrics.json"}
    STAGE_FILES = {"vqvae": ("vqvae.keras", "history.csv"), "prior": ("prior.keras", "prior_history.csv"),
                   "segmenter": ("segmenter.keras", "segmenter_history.csv")}

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path, self.read_only = Path(path), read_only

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @classmethod
    def open(cls, path: str | Path, read_only: bool = False) -> "Run":
        """An existing run folder written by train.py, or a UserError saying what is wrong."""
        run = cls(path, read_only)
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
    def training(self, config: Config, stages: tuple[str, ...], wait: bool = False):
        """Around a training command.

        It holds the run's lock: one training process per run folder; a second one is refused (or, with wait=True,
        waits its turn). The lock is the operating system's (flock), so it dies with its process: a killed run
        never blocks a later --resume. A new run's folder is made here, with its config and stages; if the command
        fails before the first checkpoint, the folder is removed again: a failed command leaves no half-made run
        behind, and never touches an existing one. A read-only Run (another worker's view) does none of this.
        """
        if self.read_only:
            yield
            return
        new = not self.exists()
        if new:
            try:
                self.path.mkdir(parents=True)
            except FileExistsError:
                raise UserError(f"run folder {self.path} was just made by another process; pick another --name") \
                    from None
        lock = self._lock(wait)
        try:
            if new:
                self.write_config(config)
                write_json(self._file("progress"), {"stages": list(stages)})
            else:
                self.remove_stale_temporaries()
            yield
        except BaseException:
            if new and not any(self.stage(name).checkpoint.exists() for name in STAGES):
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        finally:
            (self.path / self.LOCK).unlink(missing_ok=True)  # first: a waiter that got this file tries again
            os.close(lock)

    LOCK = ".training.lock"

    def _lock(self, wait: bool) -> int:
        """Takes the run's lock and writes who holds it into the lock file; returns its file descriptor."""
        path = self.path / self.LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                holder = path.read_text().strip() if path.exists() else ""
                raise UserError(f"{self.path} is being trained by {holder or 'another process'}; let it finish (or "
                                "run this again with --wait to continue after it), or stop it first") from None
            except BaseException:
                os.close(fd)
                raise
            if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else its last holder removed the file as we took it: take the new one
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
        return fd

    # config -----------------------------------------------------------------------------------------------------
    def read_config(self) -> Config:
        values = self._read_json("config", "restore it from a backup, or train a new run")
        if not isinstance(values, dict):
            raise UserError(f"{self._file('config')} is damaged (not a JSON object); restore it, or train a new run")
        try:
            config = Config.from_dict(values)
            config.validate()
        except UserError as error:
            raise UserError(f"{self._file('config')} has a setting no run can have: {error}; correct it (or restore "
                            "the file from a backup), or train a new run") from None
        return config

    def write_config(self, config: Config) -> None:
        if self.read_only:
            return
        write_json(self._file("config"), dataclasses.asdict(config))

    # progress ---------------------------------------------------------------------------------------------------
    def _progress(self) -> dict:
        return self._read_json("progress", "restore it from a backup, or delete it to train every stage anew")

    def _read_json(self, key: str, remedy: str) -> dict:
        path = self._file(key)
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{path} is damaged ({type(error).__name__}: {error}); {remedy}") from None

    def _update_progress(self, stage: str, **values) -> None:
        if self.read_only:
            return
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

    def load_vqvae(self):
        """The VQ-VAE in full precision, for evaluation and decoding, with the run's --background: a VQ-VAE saved
        before that setting existed carries the model's default, 0 (a faint haze), while config.json reads as the
        current default."""
        vqvae = self.stage("vqvae").load_model(float32=True)
        vqvae.background = self.read_config().background
        return vqvae

    def discard_stages_from(self, name: str) -> None:
        """Forgets a stage and the stages after it, which learned from it: their checkpoints, histories and progress
        (and, from the VQ-VAE on, the code caches), so they train again from scratch."""
        if self.read_only:
            return
        later = [s for s in STAGES[STAGES.index(name):] if s != "segmenter" or name == s]  # it learned no codes
        progress = self._progress()
        for stage in map(self.stage, later):
            stage.checkpoint.unlink(missing_ok=True)
            stage.history_file.unlink(missing_ok=True)
            progress.pop(stage.name, None)
        write_json(self._file("progress"), progress)
        if "vqvae" in later:
            for path in self.path.glob(self._codes_file("*").name):
                path.unlink()

    # metrics ----------------------------------------------------------------------------------------------------
    def read_metrics(self) -> dict:
        return self._read_json("metrics", "delete it: train.py and predict.py write its sections again")

    def update_metrics(self, section: str, values: dict) -> None:
        """Replaces one section of metrics.json, keeping the others. A damaged metrics.json is moved aside (kept as
        metrics.json.damaged) and a new one begun."""
        if self.read_only:
            return
        try:
            metrics = self.read_metrics()
        except UserError:
            damaged = self._file("metrics").with_suffix(".json.damaged")
            self._file("metrics").replace(damaged)
            print(f"note: {self._file('metrics')} was damaged; kept as {damaged.name}, and a new one begun")
            metrics = {}
        write_json(self._file("metrics"), {**metrics, section: values})

    # code grids -------------------------------------------------------------------------------------------------
    def _codes_file(self, split: str) -> Path:
        return self.path / f"codes_{split}.npz"

    def read_codes(self, split: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The cached (code grids (N, h, w), slice positions (N,) or None) of a split; None if not encoded yet, or
        if the cache is damaged or does not fit the run's VQ-VAE (it is then encoded again)."""
        path = self._codes_file(split)
        if not path.is_file():
            return None
        config = self.read_config()
        try:
            with np.load(path) as cache:
                codes, positions = cache["codes"], cache["positions"] if "positions" in cache else None
            problem = ""
            if codes.ndim != 3 or codes.shape[1:] != (config.grid_size, config.grid_size):
                problem = f"code grids of shape {codes.shape}, where the VQ-VAE makes (N, {config.grid_size}, " \
                          f"{config.grid_size})"
            elif codes.size and not 0 <= codes.min() <= codes.max() < config.num_embeddings:
                problem = f"codes outside 0..{config.num_embeddings - 1}"
            elif positions is not None and positions.shape != codes.shape[:1]:
                problem = f"{positions.shape[0]} slice positions for {codes.shape[0]} code grids"
        except Exception as error:  # truncated, empty or not an .npz at all
            problem = f"unreadable: {type(error).__name__}"
        if problem:
            print(f"note: the code cache {path} is damaged ({problem}); encoding the {split} split again")
            return None
        return codes, positions

    def write_codes(self, split: str, codes: np.ndarray, positions: np.ndarray | None) -> None:
        if self.read_only:
            return
        arrays = {"codes": codes} if positions is None else {"codes": codes, "positions": positions}
        atomic_write(self._codes_file(split), lambda tmp: np.savez(tmp, **arrays))

    # figures and samples ----------------------------------------------------------------------------------------
    def figure(self, name: str) -> Path:
        """Where the figure `name` (ssim, losses, recon, prior_loss, ssim_hist, recon_test, samples) goes."""
        return self.path / f"{name}.png"

    def write_samples(self, images: np.ndarray) -> Path:
        """Replaces samples/ with one 8-bit PNG per image, written into a temporary folder first: if a write fails
        (a full disk), the previous samples stay. Returns the folder."""
        folder = self.path / "samples"
        fresh = Path(tempfile.mkdtemp(dir=self.path, prefix=f".samples{TEMP_MARK}"))
        try:
            for i, image in enumerate(images):
                save_png(fresh / f"sample_{i:03d}.png", image)
            old = folder.rename(self.path / f".samples{TEMP_MARK}old") if folder.exists() else None
            fresh.rename(folder)
        except BaseException:
            shutil.rmtree(fresh, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def remove_stale_temporaries(self) -> None:
        """A process killed in the middle of an atomic write leaves its temporary file; the real file is intact."""
        for path in self.path.glob(f".*{TEMP_MARK}*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class Stage:
    """One training stage of a run ("vqvae", "prior" or "segmenter"): its checkpoint, progress and history.

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
        if self.run.read_only:
            return
        with signals_deferred():  # Ctrl-C here stops after both writes, never between them
            atomic_write(self.checkpoint, model.save)  # the temporary name keeps the .keras suffix save() requires
            self.run._update_progress(self.name, epochs_done=epochs_done)

    def mark_finished(self) -> None:
        self.run._update_progress(self.name, finished=True)

    def load_model(self, float32: bool = False):
        """The stage's checkpoint as a Keras model, with a clear error if it is missing or unreadable. float32=True
        gives a full-precision copy of a model trained with mixed precision (for evaluation and sampling)."""
        retrain = f"`python train.py --resume {self.run.path} --stage {self.name} --retrain`"
        if not self.checkpoint.is_file():
            raise UserError(f"{self.checkpoint} does not exist; train that stage: {retrain}")
        try:
            model = keras.saving.load_model(self.checkpoint)
        except Exception as error:  # a truncated, empty or foreign file
            also = " (the prior, which learned its codes, is trained again too)" if self.name == "vqvae" else ""
            raise UserError(f"cannot load {self.checkpoint} ({type(error).__name__}): the file is damaged; train "
                            f"the stage again with {retrain}{also}") from None
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
        if self.run.read_only:
            return
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

