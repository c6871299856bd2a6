"""Files -> tensors: the OASIS PNG slices as tf.data pipelines, and the built-in demo set.

Layouts accepted for --data-dir (each split is a folder of grayscale PNGs):
    OASIS as distributed:  DIR/keras_png_slices_{train,validate,test}/*.png  (seg folders beside them ignored)
    its parent:            DIR/<anything>/keras_png_slices_{train,validate,test}/*.png
    plain:                 DIR/{train,validate or val,test}/*.png

The demo set (`python dataset.py --make-demo data/demo`) has the OASIS layout and names, built from the MNI152 T1
template that nilearn ships, so everything runs without downloading OASIS.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import numpy as np

from utils import UserError

SPLITS = ("train", "validate", "test")
SPLIT_FOLDERS = {
    "train": ("keras_png_slices_train", "train"),
    "validate": ("keras_png_slices_validate", "validate", "val"),
    "test": ("keras_png_slices_test", "test"),
}


# ---------------------------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------------------------


def find_splits(data_dir: str | Path) -> dict[str, Path]:
    """Maps each split found under data_dir (or one folder below it) to its folder."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise UserError(f"--data-dir {data_dir} is a file, not a folder; pass the folder that holds the split "
                        "folders (keras_png_slices_train, ... or train/, validate/, test/)")
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} does not exist; pass --data-dir PATH to the OASIS slices "
                        "or use --demo for the built-in demo set")
    for root in [data_dir, *sorted(p for p in data_dir.iterdir() if p.is_dir())]:
        found = {}
        for split, names in SPLIT_FOLDERS.items():
            folder = next((root / n for n in names if (root / n).is_dir()), None)
            if folder is not None:
                found[split] = folder
        if found:
            return found
    raise UserError(f"{data_dir} holds no split folders; expected keras_png_slices_train/_validate/_test "
                    "(as OASIS is distributed) or train/ validate/ test/, here or one folder below")


def tissue_files(files: list[str]) -> list[str] | None:
    """The segmentation of each slice in `files`, as OASIS ships them beside the slices: keras_png_slices_seg_SPLIT/
    seg_XXX_slice_N.nii.png for keras_png_slices_SPLIT/case_XXX_slice_N.nii.png. None when any is missing (data
    without segmentations: no tissue report)."""
    found = []
    for path in map(Path, files):
        folder = path.parent.with_name(path.parent.name.replace("keras_png_slices_", "keras_png_slices_seg_", 1))
        seg = folder / path.name.replace("case_", "seg_", 1)
        if folder == path.parent or not seg.is_file():
            return None
        found.append(str(seg))
    return found


TISSUE_LEVELS = (0, 85, 170, 255)  # background, CSF, gray, white matter in the OASIS segmentations


def load_tissue(files: list[str], image_size: int) -> np.ndarray:
    """Segmentation PNGs -> (N, image_size, image_size) uint8 classes 0..3 (modules.TISSUES): each pixel's nearest
    of the OASIS levels 0/85/170/255, resized by nearest neighbour (labels must not blend)."""
    from PIL import Image

    levels = np.array(TISSUE_LEVELS)
    out = np.empty((len(files), image_size, image_size), np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                image = image.convert("L")
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), Image.NEAREST)
                values = np.asarray(image, np.int16)
        except OSError as error:
            raise UserError(f"cannot read {path} as a segmentation PNG ({error}); remove or replace the file") \
                from None
        out[i] = np.abs(values[..., None] - levels).argmin(-1)
    return out


def split_files(data_dir: str | Path, split: str) -> list[str]:
    """The sorted PNG paths of one split; a UserError if the split is missing or empty."""
    splits = find_splits(data_dir)
    if split not in splits:
        raise UserError(f"{data_dir} has no {split} split; expected one of the folders "
                        f"{', '.join(SPLIT_FOLDERS[split])} (found: {', '.join(splits) or 'none'})")
    entries = sorted(p for p in splits[split].iterdir() if p.is_file())
    # .DS_Store, README.txt, Thumbs.db, and macOS's hidden ._NAME.png companions are not slices
    files = [str(p) for p in entries if p.suffix.lower() == ".png" and not p.name.startswith(".")]
    if not files:
        raise UserError(f"split folder {splits[split]} contains no .png files; point --data-dir at the slices")
    kept = set(files)
    skipped = [p.name for p in entries if str(p) not in kept]
    if skipped and splits[split] not in _NOTED:
        _NOTED.add(splits[split])
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        print(f"note: skipped {len(skipped)} file(s) in {splits[split]} that are not PNG slices: {shown}")
    return files


_NOTED: set = set()  # split folders whose skipped files were already reported, so the note comes once


SLICE_NAME = re.compile(r"(?P<subject>.+)_slice_(?P<number>\d+)\D")  # case_001_slice_12.nii.png


def slice_positions(files: list[str]) -> np.ndarray | None:
    """Each slice's depth within its subject, in [0, 1], read from OASIS-style names (case_001_slice_12.nii.png):
    the slice number scaled by the range of numbers its subject has in `files` (0 the first slice, 1 the last).
    None when any name carries no slice number: such data trains an unconditional prior."""
    subjects = slice_subjects(files)
    if subjects is None:
        return None
    numbers = np.array([int(SLICE_NAME.match(Path(f).name)["number"]) for f in files], "float32")
    positions = np.full(len(files), 0.5, "float32")  # a subject of one slice sits in the middle
    for subject in np.unique(subjects):
        mine = subjects == subject
        low, high = numbers[mine].min(), numbers[mine].max()
        if high > low:
            positions[mine] = (numbers[mine] - low) / (high - low)
    return positions


def slice_subjects(files: list[str]) -> np.ndarray | None:
    """The subject of each slice (case_001 of case_001_slice_12.nii.png); None when a name has no slice number."""
    matches = [SLICE_NAME.match(Path(f).name) for f in files]
    if not files or not all(matches):
        return None
    return np.array([m["subject"] for m in matches])


# ---------------------------------------------------------------------------------------------------------------
# Decoding: PNG bytes -> float32 (H, W, 1) in [0, 1]
# ---------------------------------------------------------------------------------------------------------------


def decode_png(path, image_size: int):
    """One PNG -> (image_size, image_size, 1) float32 in [0, 1]. RGB/RGBA become gray; 8-bit PNGs are divided
    by 255, 16-bit PNGs scaled by their own min..max (their stored range varies between exporters)."""
    import tensorflow as tf

    raw = tf.io.read_file(path)
    image = tf.cast(tf.io.decode_png(raw, channels=1, dtype=tf.uint16), tf.float32)  # 8-bit values arrive x257
    is_16_bit = tf.equal(tf.strings.substr(raw, 24, 1), b"\x10")  # IHDR bit depth byte

    def own_range():
        lo, hi = tf.reduce_min(image), tf.reduce_max(image)
        return (image - lo) / tf.maximum(hi - lo, 1.0)

    image = tf.cond(is_16_bit, own_range, lambda: image / 65535.0)
    if image.shape[0] != image_size or image.shape[1] != image_size:  # shapes are unknown in graph mode: resize
        image = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
    image = tf.ensure_shape(image, (image_size, image_size, 1))
    return tf.clip_by_value(image, 0.0, 1.0)


def _first_bad_file(files: list[str], image_size: int) -> tuple[str, str]:
    """Decodes files one by one (only after the fast path failed) to name the culprit."""
    import tensorflow as tf

    for path in files:
        try:
            decode_png(tf.constant(path), image_size)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.DataLossError) as error:
            return path, error.message.strip().splitlines()[-1].split("[Op:")[0].strip()
    return "", ""


def _decoded(files: list[str], image_size: int):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(files).map(
        lambda p: decode_png(p, image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _raise_bad_file(files: list[str], image_size: int, error) -> None:
    path, reason = _first_bad_file(files, image_size)
    if path:
        raise UserError(f"cannot read {path} as a PNG image ({reason}); remove or replace the file") from None
    raise error


def load_images(files: list[str], image_size: int) -> np.ndarray:
    """All of `files` decoded in parallel into one (N, image_size, image_size, 1) float32 array."""
    import tensorflow as tf

    try:
        batches = [b.numpy() for b in _decoded(files, image_size).batch(256)]
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.DataLossError) as error:
        _raise_bad_file(files, image_size, error)
    return np.concatenate(batches)


@dataclasses.dataclass
class Split:
    """The images of one data split with their file names and slice positions (None without slice numbers)."""

    name: str
    files: list[str]
    images: np.ndarray
    positions: np.ndarray | None

    @classmethod
    def load(cls, data_dir: str, name: str, image_size: int) -> "Split":
        files = split_files(data_dir, name)
        return cls(name, files, load_images(files, image_size), slice_positions(files))

    def tissue(self) -> np.ndarray | None:
        """The split's tissue labels (load_tissue), or None when the data has no segmentations."""
        files = tissue_files(self.files)
        return None if files is None else load_tissue(files, self.images.shape[1])

    def subjects(self) -> np.ndarray:
        """Each slice's subject; a slice of its own where the names carry no subject."""
        subjects = slice_subjects(self.files)
        return np.array([f"{self.name} {i}" for i in range(len(self.files))]) if subjects is None else subjects

    def subject_at_depths(self, count: int) -> tuple[str, np.ndarray]:
        """The first subject of the split and the indices of `count` of its slices spread evenly over its depths,
        lowest first (the real row of the figures that put samples beside real slices at the same depths)."""
        subjects = self.subjects()
        mine = np.flatnonzero(subjects == subjects[0])
        mine = mine[np.argsort(self.positions[mine])]
        return str(subjects[0]), mine[np.linspace(0, len(mine) - 1, count).round().astype(int)]


def make_dataset(files: list[str], image_size: int, batch_size: int, shuffle: bool, seed: int = 0,
                 epoch_size: int | None = None):
    """files -> decode in parallel -> resize -> scale -> cache -> (shuffle) -> batch -> prefetch.

    Yields (images, images) pairs, since the VQ-VAE reconstructs its input. The cache is filled here, in one
    pass that also checks every file, so a corrupt PNG is reported by name before training starts and the first
    epoch reads from memory. epoch_size: the examples an epoch takes after its shuffle (a worker of several, whose
    epochs must all be as long: cluster.Cluster.epoch_size); None: all of them.
    """
    import tensorflow as tf

    dataset = _decoded(files, image_size).cache()
    try:
        for _ in dataset.batch(256):
            pass
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.DataLossError) as error:
        _raise_bad_file(files, image_size, error)
    return _from_memory(_batches(dataset, batch_size, shuffle, seed, epoch_size).map(lambda x: (x, x)))


def array_dataset(inputs, targets, batch_size: int, shuffle: bool = False, seed: int = 0, passes: int = 1,
                  epoch_size: int | None = None):
    """Arrays in memory (the prior's code grids, their conditions and layouts) -> (inputs, targets) batches, with
    the same in-memory pipeline as make_dataset. inputs: one array or a list of arrays; targets: an array or a dict.

    passes: times the batches go over the arrays, each pass reshuffled and ending in its own partial batch, as
    epochs of `fit` do; for a short training (the realism test's judges) as one `fit` epoch of `passes` passes,
    which makes one iterator instead of one per epoch: at a few steps per epoch, making them took half the time.
    epoch_size: as make_dataset's."""
    import tensorflow as tf

    inputs = tuple(inputs) if isinstance(inputs, list) else inputs  # tf.data would stack a list into one tensor
    batches = _batches(tf.data.Dataset.from_tensor_slices((inputs, targets)), batch_size, shuffle, seed, epoch_size)
    return _from_memory(batches.repeat(passes))


def shifted_code_batches(arrays: dict, shift: int, fills: dict, batch_size: int, epoch_size: int, seed: int):
    """A prior's training examples (arrays: "codes" (N, h, w) and, where used, "condition" (N, F) and "layout"
    (N, h/2, w/2)) as batches of dicts, each grid moved by a random shift of -shift, 0 or +shift codes along each
    axis (its layout by shift / 2 cells), what the move uncovers filled with fills[key] (the empty frame's code and
    layout cell); epoch_size examples an epoch, reshuffled each epoch. A brain lies anywhere in the frame: the shifted
    grids are as probable as the originals, and a prior must learn 9 times as many to memorise them."""
    import tensorflow as tf

    draws = tf.random.Generator.from_seed(seed)  # its state lives on between epochs: new shifts every epoch

    def moved(example):
        offset = (draws.uniform([2], 0, 3, dtype=tf.int32) - 1) * shift  # (dy, dx) in codes
        for key, scale in (("codes", 1), ("layout", 2)):
            if key in example:
                grid, pad = example[key], shift // scale
                padded = tf.pad(grid, [[pad, pad], [pad, pad]], constant_values=fills[key])
                example[key] = tf.slice(padded, pad - offset // scale, tf.shape(grid))
        return example

    examples = tf.data.Dataset.from_tensor_slices(arrays).shuffle(len(arrays["codes"]), seed=seed,
                                                                  reshuffle_each_iteration=True)
    return _from_memory(examples.take(epoch_size).map(moved).batch(batch_size))


def _batches(dataset, batch_size: int, shuffle: bool, seed: int, epoch_size: int | None = None):
    """Batches of a dataset held in memory, reshuffled in full each epoch when shuffle is on; the first epoch_size
    examples of each epoch's order (all when None)."""
    if shuffle:
        dataset = dataset.shuffle(int(dataset.cardinality()), seed=seed, reshuffle_each_iteration=True)
    if epoch_size is not None:
        dataset = dataset.take(epoch_size)
    return dataset.batch(batch_size)


def _from_memory(dataset):
    """One batch prefetched, and tf.data's autotuner off. With it on, the new iterator that Keras makes for each
    epoch often waited, with the CPU idle, until a back-off timer of the previous one ran out: 8 to 9 s before the
    first batch of a demo VQ-VAE epoch whose 48 steps take 12 s (benchmarks/input_pipeline.py --epochs). These
    pipelines read from memory, so there is nothing to tune."""
    import tensorflow as tf

    dataset = dataset.prefetch(1)
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


# ---------------------------------------------------------------------------------------------------------------
# The demo set: synthetic subjects from the MNI152 template
# ---------------------------------------------------------------------------------------------------------------

DEMO_SLICES = 32  # axial slices per subject, as in the OASIS PNG release
# training / validation / test subjects. The realism test's interval is over held-out subjects, not slices (a subject's
# slices are judged alike): 12 + 12 subjects of 32 slices gave real vs real +-0.10, 48 + 48 of 8 slices (the same 384
# slices a split) +-0.05 (docs/experiments.md, the realism judge)
DEMO_SUBJECTS = (48, 48, 48)
DEMO_HELD_OUT_SLICES = 8  # slices kept of each validation and test subject, spread evenly from the first to the last
DEMO_SIZE = 256  # pixels, as OASIS
DEMO_MM_PER_PIXEL = 0.8  # makes the template brain fill the frame about as OASIS brains do
DEMO_Z_RANGE = (-36.0, 68.0)  # mm, MNI z: from the temporal lobes to the upper cortex, as the OASIS slices span


def mni152_template() -> tuple[np.ndarray, np.ndarray]:
    """The 1 mm MNI152 T1 template (skull-stripped, in [0, 1]) and its tissue labels 0/85/170/255."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1).get_fdata().astype(np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata().astype(np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata().astype(np.float32)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = np.array([85, 170, 255], np.uint8)[np.argmax(np.stack([csf, gm, wm]), axis=0)]
    labels[t1 <= 0.0] = 0
    return t1, labels


def _smooth_field(rng: np.random.Generator, shape: tuple, coarse: tuple, scale: float) -> np.ndarray:
    """Random noise on a coarse grid, interpolated (cubic spline) up to `shape`: a smooth random field."""
    from scipy import ndimage

    field = rng.normal(0.0, scale, coarse).astype(np.float32)
    for axis, (n, c) in enumerate(zip(shape, coarse)):
        # Spline zoom is linear and separable: zooming the identity gives its (n, c) matrix for one axis.
        matrix = ndimage.zoom(np.eye(c, dtype=np.float32), (n / c, 1), order=3, mode="nearest")
        field = np.moveaxis(np.tensordot(matrix, field, axes=(1, axis)), 0, axis)
    return field


def demo_subject(t1: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic subject: (DEMO_SLICES, 256, 256) uint8 slices and their labels."""
    from scipy import ndimage

    shape = (DEMO_SLICES, DEMO_SIZE, DEMO_SIZE)
    # Output grid in mm around the brain's centre: rows run anterior -> posterior, columns left -> right.
    z0, z1 = DEMO_Z_RANGE
    z = np.linspace(z0, z1, DEMO_SLICES) + rng.uniform(-3, 3)
    half = DEMO_SIZE / 2 * DEMO_MM_PER_PIXEL
    row = np.linspace(half, -half, DEMO_SIZE) - 18.0  # the template brain is centred about 18 mm posterior of y = 0
    col = np.linspace(-half, half, DEMO_SIZE)
    grid = np.stack(np.meshgrid(z, row, col, indexing="ij"))  # (3, S, H, W) as (z, y, x) in mm
    # Random affine: per-axis scaling, rotation mostly in-plane, a shift.
    angles = np.deg2rad([rng.uniform(-10, 10), rng.uniform(-4, 4), rng.uniform(-4, 4)])
    rot = np.eye(3)
    for axis, angle in enumerate(angles):  # rotations about z, y, x in turn
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[[i, i, j, j], [i, j, i, j]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
        rot = rot @ r
    matrix = rot @ np.diag(rng.uniform(0.88, 1.12, 3))
    points = np.einsum("ij,j...->i...", matrix, grid) + rng.uniform(-5, 5, (3, 1, 1, 1))
    # Smooth random deformation, up to a few mm.
    points += np.stack([_smooth_field(rng, shape, (4, 6, 6), 2.5) for _ in range(3)])
    # mm (z, y, x) -> template voxel indices (x, y, z); the 1 mm template's origin is at (-98, -134, -72) mm.
    voxels = np.stack([points[2] + 98.0, points[1] + 134.0, points[0] + 72.0]).reshape(3, -1)
    image = ndimage.map_coordinates(t1, voxels, order=1, mode="constant", cval=0.0).reshape(shape)
    label = ndimage.map_coordinates(labels, voxels, order=0, mode="constant", cval=0).reshape(shape)
    # Intensity: gamma, a smooth multiplicative bias field, scanner noise inside the head.
    inside = image > 0.02
    image = image ** rng.uniform(0.75, 1.35)
    image *= np.exp(_smooth_field(rng, shape, (3, 4, 4), 0.12))
    image += rng.normal(0.0, rng.uniform(0.005, 0.025), shape) * inside
    image = np.where(inside, image / max(np.percentile(image[inside], 99.8), 1e-6), 0.0)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label.astype(np.uint8)


def make_demo(out_dir: str | Path, subjects: tuple[int, int, int] = DEMO_SUBJECTS, seed: int = 0,
              verbose: bool = True, held_out_slices: int = DEMO_HELD_OUT_SLICES) -> Path:
    """Writes an OASIS-layout demo set: keras_png_slices_{split} and keras_png_slices_seg_{split} folders of
    256x256 PNGs named case_XXX_slice_N.nii.png. Each subject lies wholly in one split. Same seed, same bytes.
    Training subjects have all DEMO_SLICES slices; validation and test subjects `held_out_slices` of them, evenly
    spread and keeping their numbers (so their depths are those of the full subject).
    The set is built in a hidden folder beside out_dir and renamed at the end: an interrupted build leaves no
    half-written out_dir."""
    import shutil

    from PIL import Image

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} already exists and is not empty; remove it or pick another folder")
    if not 2 <= held_out_slices <= DEMO_SLICES:
        raise UserError(f"held-out subjects need 2 to {DEMO_SLICES} slices, got {held_out_slices}")
    partial = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    kept = {"train": np.arange(DEMO_SLICES),
            **dict.fromkeys(SPLITS[1:], np.linspace(0, DEMO_SLICES - 1, held_out_slices).round().astype(int))}
    t1, labels = mni152_template()
    case = 0
    for split, count in zip(SPLITS, subjects):
        image_dir = partial / f"keras_png_slices_{split}"
        seg_dir = partial / f"keras_png_slices_seg_{split}"
        image_dir.mkdir(parents=True)
        seg_dir.mkdir(parents=True)
        for _ in range(count):
            case += 1
            images, segs = demo_subject(t1, labels, np.random.default_rng([seed, case]))
            for i in kept[split]:
                Image.fromarray(images[i]).save(image_dir / f"case_{case:03d}_slice_{i}.nii.png")
                Image.fromarray(segs[i]).save(seg_dir / f"seg_{case:03d}_slice_{i}.nii.png")
            if verbose and sys.stdout.isatty():  # a progress line in a terminal, not hundreds in a log file
                print(f"\rdemo set: subject {case}/{sum(subjects)}", end="", flush=True)
    partial.replace(out_dir)
    if verbose:
        print(f"\rdemo set: {subjects[0]} training subjects x {DEMO_SLICES} slices, {subjects[1]} validation and "
              f"{subjects[2]} test subjects x {held_out_slices} slices written to {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-demo", metavar="DIR", required=True, help="write the demo set into DIR")
    parser.add_argument("--subjects", type=int, nargs=3, default=DEMO_SUBJECTS, metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--held-out-slices", type=int, default=DEMO_HELD_OUT_SLICES, metavar="N",
                        help=f"slices kept of each validation and test subject (default {DEMO_HELD_OUT_SLICES}; "
                             f"{DEMO_SLICES}: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if min(args.subjects) < 1:
            raise UserError(f"--subjects needs at least one subject per split, got {args.subjects}")
        make_demo(args.make_demo, tuple(args.subjects), args.seed, held_out_slices=args.held_out_slices)
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
