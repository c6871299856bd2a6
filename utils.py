"""The pieces train.py and predict.py share: the configuration, the run folder, metrics with their trivial floors,
plots, and the scripts' common `main`.

Only numpy is imported here at import time; Keras is imported inside the functions that need it (any backend).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag, bad data). Scripts print it as one line and exit 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's time limit) arrived. Raised in the main thread by the scripts'
    signal handler, between two Python steps: a training step or a file write in flight is not cut in half. A
    KeyboardInterrupt, so that no library's `except Exception` swallows or rewraps it."""

    def __init__(self, signal_number: int, detail: str = ""):
        self.signal_number = signal_number
        super().__init__(f"stopped by {signal.Signals(signal_number).name}" + (f": {detail}" if detail else ""))


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupted(signal_number, frame):
    raise Interrupted(signal_number)


def script_main(body, argv: list[str] | None) -> int:
    """Runs a script's body(argv). A UserError becomes one line on stderr ("error: ...") and exit code 2; Ctrl-C or
    SIGTERM one line (what is safe, what to type) and exit code 128 + the signal's number, as shells report it."""
    previous = {number: signal.signal(number, _raise_interrupted) for number in STOP_SIGNALS}
    try:
        body(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"{stop}", file=sys.stderr)
        return 128 + stop.signal_number
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 0


@contextlib.contextmanager
def signals_deferred():
    """Holds Ctrl-C and SIGTERM until the block has ended, so that what it writes together (a checkpoint and the
    epoch count that vouches for it) is written together."""
    received: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])  # now handled as usual: Interrupted, or the default action


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


BRAIN_THRESHOLD = 0.02  # intensity above which a pixel counts as brain (the background of skull-stripped slices is 0)


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
    prior_layout_levels: int = setting(0, "0: one prior over the codes; L >= 2: a two-level prior that first samples "
                                          "a coarse layout (each 2x2 codes' mean decoded intensity in L bins) with a "
                                          "PixelCNN of its own, then the codes given it")
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
                            f"pick a multiple, e.g. {max(self.image_size // self.downsample, 1) * self.downsample}")
        if self.image_size // self.downsample < 2:
            raise UserError(f"--image-size {self.image_size} / --downsample {self.downsample} leaves a code grid "
                            "smaller than 2x2; use a larger image or a smaller factor")
        for field in ("learning_rate", "prior_learning_rate"):
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
        if self.prior_position_frequencies < 0:
            raise UserError(f"--prior-position-frequencies must be 0 or more, got {self.prior_position_frequencies}")
        if not 0 <= self.background < 1:
            raise UserError(f"--background must be at least 0 and below 1, got {self.background}")
        if not self.commitment_cost >= 0:
            raise UserError(f"--commitment-cost must be 0 or more, got {self.commitment_cost}")

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
                    attention_layers=self.prior_attention_layers, layout_levels=self.prior_layout_levels)

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
    prior_channels=32,  # 32 channels, 6 layers at 2e-3: samples told from real 58% of the time (3 draws), test NLL
    prior_layers=6,  # 2.67-2.75 bits/code, in 0.35x the step time of 48 channels, 10 layers at 1e-3 (55%, 2.74)
    prior_kernel_size=3,
    prior_epochs=16,  # 12 epochs of 8 layers in the same time: NLL 2.85. README, Generation
    prior_learning_rate=2e-3,  # at 1e-3 the same prior reached NLL 3.00: a small prior needs the larger step
    prior_layout_levels=8,  # two levels: a 16x16 layout first, then the codes given it (one level: NLL 2.89)
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


class DiskFull(UserError):
    """A write failed for want of space (a full disk, a quota, a file size limit)."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def atomic_write(path: str | Path, write) -> None:
    """Calls write(tmp_path), then renames tmp_path onto path: readers see the old file or the new, never half.
    If the disk is full, the temporary file is removed, the old file stays, and DiskFull says how much was needed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}{TEMP_MARK}", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; a run folder is for sharing
        os.replace(tmp, path)
    except BaseException as error:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if _no_space(error):
            needed = max(written, path.stat().st_size if path.exists() else 0)
            free = shutil.disk_usage(path.parent).free
            kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
            raise DiskFull(f"could not write {path}: {_reason(error)} (it needs about {_megabytes(needed)}, "
                           f"{_megabytes(free)} are free there; {kept})") from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _no_space(error: BaseException) -> bool:
    """Whether an error, or one it was raised from, is a full disk or quota (libraries wrap OSError their way)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _reason(error: BaseException) -> str:
    while error is not None and not (isinstance(error, OSError) and error.strerror):
        error = error.__cause__ or error.__context__
    return error.strerror.lower() if error is not None else "no space left on device"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


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
        codes_SPLIT.npz     the train and validation splits as code grids (and slice positions), encoded once
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
    def training(self, config: Config, stages: tuple[str, ...], wait: bool = False):
        """Around a training command.

        It holds the run's lock: one training process per run folder; a second one is refused (or, with wait=True,
        waits its turn). The lock is the operating system's (flock), so it dies with its process: a killed run
        never blocks a later --resume. A new run's folder is made here, with its config and stages; if the command
        fails before the first checkpoint, the folder is removed again: a failed command leaves no half-made run
        behind, and never touches an existing one.
        """
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
        return Config.from_dict(values)

    def write_config(self, config: Config) -> None:
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
        later = STAGES[STAGES.index(name):]
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
        with signals_deferred():  # Ctrl-C here stops after both writes, never between them
            atomic_write(self.checkpoint, model.save)  # the temporary name keeps the .keras suffix save() requires
            self.run._update_progress(self.name, epochs_done=epochs_done)

    def mark_finished(self) -> None:
        self.run._update_progress(self.name, finished=True)

    def load_model(self, float32: bool = False):
        """The stage's checkpoint as a Keras model, with a clear error if it is missing or unreadable. float32=True
        gives a full-precision copy of a model trained with mixed precision (for evaluation and sampling)."""
        import keras

        import modules

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


def code_layouts(vqvae, codes: np.ndarray, levels: int) -> np.ndarray:
    """(N, h, w) code grids -> (N, h/2, w/2) layout grids of their decoded slices (VQVAE.layout), in batches: what a
    two-level prior models first."""
    return batched(lambda grids: vqvae.layout(grids, levels), codes)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The SSIM window's 1D factor: the 2D Gaussian window is its outer product with itself."""
    coords = np.arange(size) - (size - 1) / 2
    g = np.exp(-coords**2 / (2 * sigma**2))
    return (g / g.sum()).astype("float32")


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) of two (N, H, W, 1) batches in [0, 1], computed as tf.image.ssim does it:
    an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, valid positions only; in keras.ops, any backend.
    The five local means (x, y, x^2, y^2, xy) are one depthwise convolution of a 5-channel stack, done as a column
    pass and a row pass of the separable window: 22 multiplications per pixel and channel instead of 121."""
    from keras import ops

    g, c1, c2 = _gaussian_window(), 0.01**2, 0.03**2
    columns, rows = np.tile(g[:, None, None, None], (1, 1, 5, 1)), np.tile(g[None, :, None, None], (1, 1, 5, 1))
    scores = []
    for i in range(0, len(a), 256):
        x, y = (ops.convert_to_tensor(np.asarray(v[i:i + 256], "float32")) for v in (a, b))
        stack = ops.concatenate([x, y, x * x, y * y, x * y], axis=-1)  # (N, H, W, 5)
        local = ops.depthwise_conv(ops.depthwise_conv(stack, columns, padding="valid"), rows, padding="valid")
        mean_x, mean_y, xx, yy, xy = (local[..., k] for k in range(5))  # Gaussian-weighted local means
        luminance = (2 * mean_x * mean_y + c1) / (mean_x**2 + mean_y**2 + c1)
        structure = ((2 * (xy - mean_x * mean_y) + c2)
                     / (xx + yy - (mean_x**2 + mean_y**2) + c2))  # contrast x structure
        scores.append(np.asarray(ops.mean(luminance * structure, axis=(1, 2))))
    return np.concatenate(scores)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image peak signal-to-noise ratio in dB for images in [0, 1]."""
    mse = np.mean((np.asarray(a, "float64") - np.asarray(b, "float64")) ** 2, axis=(1, 2, 3))
    return (10 * np.log10(1.0 / np.maximum(mse, 1e-20))).astype("float32")


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


def reconstruction_scores(real: np.ndarray, fake: np.ndarray, per_slice_ssim: np.ndarray | None = None) -> dict:
    """SSIM, SSIM on the brain's bounding box and PSNR of reconstructions, each as mean / median / min
    (per_slice_ssim: ssim(real, fake) when the caller has it already)."""
    per_slice_ssim = ssim(real, fake) if per_slice_ssim is None else per_slice_ssim
    return {"ssim": summarize(per_slice_ssim), "ssim_brain_crop": summarize(ssim_brain_crop(real, fake)),
            "psnr": summarize(psnr(real, fake))}


def codebook_usage(indices, num_embeddings: int) -> dict:
    """Perplexity (exp of the entropy of code frequencies: K when all codes are used equally, 1 when one code
    takes everything) and the number of codes used at least once, over an array of indices."""
    counts = np.bincount(np.asarray(indices, "int64").reshape(-1), minlength=num_embeddings)
    probs = counts / max(counts.sum(), 1)
    entropy = -np.sum(probs * np.log(np.maximum(probs, 1e-12)))
    return {"perplexity": float(np.exp(entropy)), "codes_used": int(np.sum(counts > 0))}


def bits_per_code(prior, codes: np.ndarray, conditions: np.ndarray | None = None, layouts: np.ndarray | None = None,
                  batch_size: int = 64) -> float:
    """Mean negative log-likelihood of code grids (given their conditions) under the prior, in bits per code. A
    two-level prior also needs the grids' layouts (VQVAE.layout): their NLL is counted too, as it is part of the
    codes' (p(codes) = p(layout) p(codes | layout))."""
    import keras

    total = 0.0
    for start in range(0, len(codes), batch_size):
        batch = np.asarray(codes[start:start + batch_size], "int32")
        layout = np.asarray(layouts[start:start + batch_size], "int32") if prior.layout_levels else None
        outputs = prior(prior.pack_inputs(batch, None if conditions is None else conditions[start:start + batch_size],
                                          layout))
        targets = prior.pack_targets(batch, layout)  # the structure of the outputs: a dict with two levels
        for output, target in zip(keras.tree.flatten(outputs), keras.tree.flatten(targets)):
            logits = np.asarray(output, "float64")  # (B, h, w, classes)
            top = logits.max(-1, keepdims=True)
            log_norm = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
            total += float(np.sum(log_norm - np.take_along_axis(logits, target[..., None], -1)[..., 0]))
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


def downsized(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 1) -> (N, size, size, 1): area averages where the size divides, else antialiased bilinear."""
    n, h, w, _ = images.shape
    if h % size == 0 and w % size == 0:
        return images.reshape(n, size, h // size, size, w // size, 1).mean(axis=(2, 4))
    from keras import ops

    return np.asarray(ops.image.resize(images, (size, size), interpolation="bilinear", antialias=True))


# The realism test (classifier two-sample test): its judge and how it is trained. The README's "Choosing the judge"
# measured these against the alternatives.
JUDGE_CHANNELS = (8, 16, 32, 64)  # the judge's four strided convolutions
C2ST_SIZE = 128  # the judge sees images at this size at most: at 64 px the samples' blotchy texture averages away
C2ST_FOLDS = 3  # each image judged by a judge trained on the other two thirds: half the training of 5 folds
C2ST_EPOCHS = 40  # at 20 the judge had not learned to look yet


def realism_classifier(size: int):
    """The C2ST's judge: four stride-2 3x3 convolutions (8, 16, 32, 64 channels), then the average over positions of
    the map's evidence, then one logit, "second set". Averaging local evidence (as a PatchGAN discriminator does)
    lets it learn from every patch, which generalises from a few hundred images: flattening the map instead, it
    memorised them and scored samples that no eye takes for real as 0.55 (README, "the realism test"). Its
    narrow first layers make it 1.7x faster than with 16, 32, 64, 64 channels and no less sharp (README)."""
    import keras
    from keras import layers

    model = keras.Sequential([keras.Input((size, size, 1))]
                             + [layers.Conv2D(channels, 3, strides=2, padding="same", activation="relu")
                                for channels in JUDGE_CHANNELS]
                             + [layers.GlobalAveragePooling2D(), layers.Dropout(0.3), layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  steps_per_execution=16)  # small steps: run 16 per call, not one (the same steps, faster)
    return model


_JUDGES: dict = {}  # size -> (a compiled judge, its optimizer's initial state)


def _fresh_judge(size: int):
    """A judge with the weights realism_classifier(size) draws under the current seed and a fresh optimizer, in a
    model whose training step is already compiled: a new model per fold would trace its step anew, which takes
    longer than training it on a few hundred small images."""
    drawn = realism_classifier(size)  # fresh weights and dropout seed; compiled, never run: cheap
    if size not in _JUDGES:
        drawn.optimizer.build(drawn.trainable_variables)
        _JUDGES[size] = drawn, [np.asarray(v) for v in drawn.optimizer.variables]
        return drawn
    judge, optimizer_state = _JUDGES[size]
    for target, source in zip(judge.variables, drawn.variables):  # weights and the dropout's seed state
        target.assign(source)
    for variable, value in zip(judge.optimizer.variables, optimizer_state):  # step count and Adam's moments
        variable.assign(value)
    return judge


def c2st(first, second: np.ndarray, groups: tuple | None = None, folds: int = C2ST_FOLDS,
         epochs: int = C2ST_EPOCHS, size: int = C2ST_SIZE, seed: int = 0) -> dict:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017): can a small CNN tell images of `second` from images of
    `first`? Both sets are cut to the same size n and downsized to at most size x size; in k-fold cross-validation
    each image is judged by a classifier trained on the other folds. The accuracy is 0.5 when the sets cannot be
    told apart and 1.0 when they always can.

    first: one array, or a list of arrays, the draws (e.g. fresh samples each time). Each draw is judged against
    `second` with folds and judges of its own, and the accuracy is over every draw's judgments: one draw of 128
    samples moves by about 0.1 with the seed (README, "One draw is not enough"); "draws" lists each draw's.

    groups: (ids of first, or a list of them per draw; ids of second), e.g. each slice's subject. A group's images
    share a fold, so no image is judged by a classifier that learned its near-duplicates (its subject's
    neighbouring slices), which would reward memorising subjects rather than telling the sets apart. Each set's
    groups are dealt out over the folds on their own, so that every fold holds both sets. With fewer than 2 groups
    in a set, its images are judged one by one ("grouped": false). Default: every image is a group of its own; the
    same id in two draws is the same group (the same subject judged again).

    The 95% interval resamples whole groups (a cluster bootstrap) over all draws: the slices of one subject are
    judged alike, so a few subjects make a wide interval however many slices or draws they have.
    """
    draws = first if isinstance(first, list) else [first]
    first_ids = groups[0] if groups is not None else None
    first_ids = first_ids if isinstance(first_ids, list) else [first_ids] * len(draws)
    second_ids = np.arange(len(second)) if groups is None else groups[1]
    second = (second, np.asarray(second_ids).astype(str))
    results = []
    for draw, (images, ids) in enumerate(zip(draws, first_ids)):
        ids = [f"draw {draw} image {i}" for i in range(len(images))] if ids is None else ids  # new images each draw
        results.append(_judged((images, np.asarray(ids).astype(str)), second, folds, epochs, size,
                               seed=seed + draw * folds))  # no two judges share a seed
    outcomes = [np.concatenate([r["correct"][s] for r in results]) for s in (0, 1)]
    ids = [np.unique(np.concatenate([r["labels"][s] for r in results]), return_inverse=True)[1] for s in (0, 1)]
    interval = cluster_bootstrap_interval(outcomes, ids, np.random.default_rng(seed))
    return {"accuracy": float(np.concatenate(outcomes).mean()), "ci95": interval,
            "draws": [float(np.concatenate(r["correct"]).mean()) for r in results],
            "n_per_set": len(results[0]["correct"][0]), "folds": min(r["folds"] for r in results),
            "grouped": groups is not None and all(r["grouped"] for r in results),
            "groups_per_set": [int(i.max() + 1) for i in ids]}


def _judged(first: tuple, second: tuple, folds: int, epochs: int, size: int, seed: int) -> dict:
    """One draw of the C2ST: (images, group labels) of each set; whether each judged image was judged right, and
    the group labels of the judged images (each image's own index where a set has fewer than 2 groups)."""
    import keras

    import dataset  # not at the top: dataset imports this module

    rng = np.random.default_rng(seed)
    n, size = min(len(first[0]), len(second[0])), min(size, first[0].shape[1])
    picks = [rng.permutation(len(images))[:n] for images, _ in (first, second)]
    x = np.concatenate([downsized(s[0][p], size) for s, p in zip((first, second), picks)]).astype("float32")
    y = np.repeat([0.0, 1.0], n).astype("float32")
    labels = [s[1][p] for s, p in zip((first, second), picks)]
    ids = [np.unique(label, return_inverse=True)[1] for label in labels]  # each set's groups, numbered from 0
    grouped = min(i.max() + 1 for i in ids) >= 2
    if not grouped:  # judged one by one: each image a group of its own
        labels = [np.array([f"{label} #{p}" for label, p in zip(l, pick)]) for l, pick in zip(labels, picks)]
        ids = [np.arange(n), np.arange(n)]
    folds = min(folds, *(i.max() + 1 for i in ids))
    fold = np.concatenate([(rng.permutation(i.max() + 1) % folds)[i] for i in ids])  # a group's images share one
    judged = np.zeros(2 * n, bool)
    for k in range(folds):
        keras.utils.set_random_seed(seed + k)
        model = _fresh_judge(size)
        train, test = fold != k, fold == k
        ones = y[train].mean()  # folds of whole groups are not balanced: weigh the classes equal in training, or a
        weights = {0: 0.5 / (1 - ones), 1: 0.5 / ones}  # judge that sees no difference guesses the majority
        passes = dataset.array_dataset(x[train], y[train], 32, shuffle=True, seed=seed + k, passes=epochs)
        model.fit(passes, epochs=1, verbose=0, shuffle=False, class_weight=weights)  # `epochs` passes, each shuffled
        logits = batched(lambda batch: model(batch, training=False), x[test])[:, 0]  # eager: no retracing per fold
        judged[test] = (logits > 0) == (y[test] == 1)
    return {"correct": (judged[:n], judged[n:]), "labels": labels, "grouped": bool(grouped), "folds": folds}


def cluster_bootstrap_interval(outcomes: list, ids: list, rng, resamples: int = 2000) -> list[float]:
    """95% interval of the mean of boolean outcomes (one array per set) when the outcomes of a group (ids) are
    alike: each resample draws whole groups, with replacement, within each set."""
    correct, total = 0.0, 0.0
    for outcome, group in zip(outcomes, ids):
        per_group = np.bincount(group, weights=outcome), np.bincount(group)  # correct and judged per group
        draws = rng.integers(0, len(per_group[1]), (resamples, len(per_group[1])))
        correct, total = correct + per_group[0][draws].sum(1), total + per_group[1][draws].sum(1)
    return [float(v) for v in np.percentile(correct / total, [2.5, 97.5])]


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


def plot_image_rows(path: Path, rows: dict, title: str = "", captions: dict | None = None) -> None:
    """A grid of grayscale images: each item of `rows` is (label, images (N, H, W, 1)); `captions` maps a row's label
    to one short text per image, written under it."""
    plt = _pyplot()
    n_cols = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.6 * n_cols, 1.8 * len(rows)), squeeze=False)
    for axes_row, (label, images) in zip(axes, rows.items()):
        texts = (captions or {}).get(label, [])
        for col, ax in enumerate(axes_row):
            ax.axis("off")
            if col < len(images):
                ax.imshow(images[col][..., 0], cmap="gray", vmin=0, vmax=1)
            if col < len(texts):
                ax.text(0.5, -0.02, texts[col], transform=ax.transAxes, ha="center", va="top", fontsize=7)
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
