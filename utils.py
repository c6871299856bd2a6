"""The small pieces train.py, predict.py and realism.py share: the scripts' common `main` and signal handling,
atomic file writes, metrics with their trivial floors, and plots.

Only numpy is imported here at import time; Keras is imported inside the functions that need it (any backend).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
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


_received: list[int] = []  # the stop signals this script has received
_raise_at_once = [True]  # False inside stops_at_safe_points: the handler only notes the signal


def _on_stop_signal(signal_number, frame):
    _received.append(signal_number)
    if _raise_at_once[0]:
        raise Interrupted(signal_number)


def raise_if_stopped() -> None:
    """Raises Interrupted for a stop signal that arrived before: the safe points of stops_at_safe_points (training
    calls it at every batch end and epoch start, `batched` between batches). Outside them the handler raises wherever
    the main thread is, and where that is a __del__ method or a weakref callback, Python prints "Exception ignored"
    and goes on: this raises it again."""
    if _received:
        raise Interrupted(_received[0])


@contextlib.contextmanager
def stops_at_safe_points():
    """Inside the block a stop signal is only noted, and raise_if_stopped raises it. Raised by the handler wherever
    the main thread is, it can land in Python code that TensorFlow's C++ is calling, which does not always check for
    an exception: a train.py stopped by Ctrl-C just after an epoch once died of a segmentation fault (a NULL read
    in lib_pywrap_tensorflow_common.so) instead of saying its one line. train.py trains inside this block."""
    previous, _raise_at_once[0] = _raise_at_once[0], False
    try:
        yield
        raise_if_stopped()  # a signal noted after the last safe point
    finally:
        _raise_at_once[0] = previous


def script_main(body, argv: list[str] | None) -> int:
    """Runs a script's body(argv). A UserError becomes one line on stderr ("error: ...") and exit code 2; Ctrl-C or
    SIGTERM one line (what is safe, what to type) and exit code 128 + the signal's number, as shells report it."""
    _received.clear()
    previous = {number: signal.signal(number, _on_stop_signal) for number in STOP_SIGNALS}
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


WRITING = threading.RLock()  # held inside signals_deferred: cluster.py's watch waits for it before it exits


@contextlib.contextmanager
def signals_deferred():
    """Holds Ctrl-C and SIGTERM until the block has ended, so that what it writes together (a checkpoint and the
    epoch count that vouches for it) is written together. It holds WRITING too, which a worker that stops because
    another died takes before it exits."""
    received: list[int] = []
    with WRITING:
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
# Atomic writes: a kill at any moment leaves the old file or the new, never half of one
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



# ---------------------------------------------------------------------------------------------------------------
# Metrics, each read beside the trivial floors it must beat
# ---------------------------------------------------------------------------------------------------------------

BRAIN_THRESHOLD = 0.02  # intensity above which a pixel counts as brain (the background of skull-stripped slices is 0)




def batched(fn, array, batch_size: int = 64) -> np.ndarray:
    """fn applied to consecutive batches of `array` (a model call, say), the outputs joined as one NumPy array."""
    outputs = []
    for i in range(0, len(array), batch_size):
        raise_if_stopped()  # a safe point of stops_at_safe_points: code extraction takes minutes on OASIS
        outputs.append(np.asarray(fn(array[i:i + batch_size])))
    return np.concatenate(outputs)


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


def nearest_ssim(queries: np.ndarray, pool: np.ndarray, shortlist: int = 32) -> np.ndarray:
    """For each query image, the highest SSIM against any image of `pool` (both (N, H, W, 1) in [0, 1]).

    Exact SSIM against every pool image costs too much on a CPU (16 x 9,664 full-size SSIMs on OASIS), so the
    `shortlist` pool images nearest in L2 on 32x32 thumbnails are scored with SSIM and the best is kept.
    """
    q, p = (downsized(images, 32).reshape(len(images), -1) for images in (queries, pool))
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
    height = 1.8 * len(rows) + 0.4 * bool(title)  # inches: a row, its label and captions; the title's band
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.6 * n_cols, height), squeeze=False)
    fig.subplots_adjust(top=1 - 0.5 / height, bottom=0.1 / height, hspace=0.25)  # fixed margins, whatever the rows
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
        fig.suptitle(title, fontsize=10, y=1 - 0.1 / height)
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


TISSUE_COLOURS = np.array([[0, 0, 0], [0.9, 0.2, 0.2], [0.3, 0.8, 0.3], [0.3, 0.5, 1.0]])  # bg, CSF, gray, white


def depth_bands(positions, bands: int) -> np.ndarray:
    """The depth band (0 .. bands - 1) of each slice position in [0, 1]: bands equal parts, 1.0 in the last."""
    return np.minimum((np.asarray(positions) * bands).astype(int), bands - 1)


def plot_anatomy(path: Path, stats: dict, generated: tuple, tissues: tuple, bands: int) -> None:
    """The tissue report's figure: per depth band (columns), the real test slices' and the samples' mean tissue
    maps (CSF red, gray matter green, white matter blue), a sample with its tissue map; below, per band, the tissue
    fractions and the pieces per slice of each tissue, real (hatched) beside generated. stats: realism.tissue_report's
    (per set: per band statistics; "labels": per set label maps); generated: (images, depths) of the samples."""
    plt = _pyplot()
    images, depths = generated
    band_of = depth_bands(depths, bands)
    fig = plt.figure(figsize=(2.0 * bands, 12.5))
    grid = fig.add_gridspec(6, bands, height_ratios=[1, 1, 1, 1, 0.9, 0.9], hspace=0.35)
    rows = ("real test: mean tissue map", "samples: mean tissue map", "a sample", "its tissue map")
    for b in range(bands):
        sample = np.flatnonzero(band_of == b)
        panels = [None if stats[s][b] is None else np.tensordot(stats[s][b]["maps"], TISSUE_COLOURS, axes=(0, 0))
                  for s in ("test", "generated")]
        panels += [None, None] if not len(sample) else [
            images[sample[0], ..., 0], TISSUE_COLOURS[stats["labels"]["generated"][sample[0]]]]
        for row, panel in enumerate(panels):
            ax = fig.add_subplot(grid[row, b])
            ax.axis("off")
            if panel is not None:
                ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1)
            if b == 0:
                ax.set_title(rows[row], fontsize=9, loc="left")
            if row == 0:
                ax.text(0.5, 1.2, f"depth {b / bands:.1f}-{(b + 1) / bands:.1f}", transform=ax.transAxes,
                        ha="center", fontsize=9)
    for row, (key, label) in enumerate((("fraction", "share of the brain"), ("pieces", "pieces per slice"))):
        ax = fig.add_subplot(grid[4 + row, :])
        width = 0.8 / (2 * len(tissues))
        for t, tissue in enumerate(tissues):
            for s, (name, hatch) in enumerate((("test", "//"), ("generated", ""))):
                values = [np.nan if st is None else (st["fraction"][tissue] if key == "fraction" else
                                                     np.mean(st["shapes"][f"{tissue}_pieces"]))
                          for st in stats[name]]
                ax.bar(np.arange(bands) + (2 * t + s - len(tissues)) * width + width / 2, values, width,
                       color=TISSUE_COLOURS[t + 1], hatch=hatch, edgecolor="k", linewidth=0.3,
                       label=f"{tissue}, {'real' if name == 'test' else 'samples'}")
        ax.set_xticks(np.arange(bands), [f"{b / bands:.1f}-{(b + 1) / bands:.1f}" for b in range(bands)])
        ax.set(ylabel=label, xlabel="depth band")
        ax.grid(alpha=0.3, axis="y")
        if row == 0:
            ax.legend(fontsize=7, ncol=3)
    fig.suptitle("Tissue report: real test slices vs samples at the same depths", fontsize=11)
    save_figure(fig, path)
