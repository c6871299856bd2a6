"""Shared fixtures: a tiny demo set (built once per session) and tiny PNG trees; helpers that let the model
tests run on either Keras backend (KERAS_BACKEND=jax runs them under JAX, as CI does)."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# XLA compiles the tests' tiny models without LLVM's optimisations (JAX's, and TensorFlow's with XLA on; subprocesses
# inherit it): compiling is most of a JAX test's time, running their tiny steps hardly any. CI's JAX part 140 s ->
# 87 s, the two JAX two-worker tests 232 s -> 146 s; the lowered HLO the no-scatter check reads is the same.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import keras
import numpy as np
import pytest
from PIL import Image

import dataset


BACKEND = keras.backend.backend()
ROOT = Path(__file__).resolve().parents[1]


def run_script(args, script="train.py", **kwargs) -> subprocess.CompletedProcess:
    """The project's script in a process of its own, as a user starts it; its output captured as text."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


def gradients(fn, *args):
    """The gradients of a scalar fn(*args) with respect to each of its tensor arguments, on the current backend."""
    if BACKEND == "jax":
        import jax

        return jax.grad(fn, argnums=tuple(range(len(args))))(*args)
    import tensorflow as tf

    args = [tf.convert_to_tensor(a) for a in args]
    with tf.GradientTape() as tape:
        tape.watch(args)
        value = fn(*args)
    return tape.gradient(value, args)


def compiled(fn):
    """fn as one compiled graph on the current backend (jax.jit or tf.function)."""
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    return tf.function(fn)


def eager_loops():
    """A context in which ops.fori_loop runs step by step with concrete values, so a callback can record them."""
    if BACKEND == "jax":
        import jax

        return jax.disable_jit()
    return contextlib.nullcontext()  # TensorFlow runs loops eagerly outside tf.function


# The smallest settings that train both stages end to end: 32 px images, 8x8 code grids, a few hundred weights, a
# one-level prior (the two-level one has tests of its own: test_prior, test_compiled, test_cli's largest prior).
TINY = ["--image-size", "32", "--hidden-channels", "8", "--num-res-blocks", "1", "--num-embeddings", "16",
        "--embedding-dim", "4", "--batch-size", "16", "--prior-channels", "8", "--prior-layers", "2",
        "--prior-kernel-size", "3", "--prior-layout-levels", "0", "--segmenter-channels", "4", "--segmenter-epochs",
        "2"]


@pytest.fixture
def tiny_args(demo_dir):
    """tiny_args(runs, name, *extra) -> train.py flags for a tiny run on the tiny demo set."""

    def make(runs, name, *extra):
        return ["--data-dir", str(demo_dir), "--runs-dir", str(runs), "--name", name, *TINY, *extra]

    return make


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo set at its smallest: 2 train, 1 validation and 1 test subject, all their slices (128): one held-out
    subject of 8 slices is too few for the tests' batches and depth bands."""
    return dataset.make_demo(tmp_path_factory.mktemp("demo"), subjects=(2, 1, 1), seed=0, verbose=False,
                             held_out_slices=dataset.DEMO_SLICES)


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def brainish(size=32, seed=0, dtype=np.uint8, value=None):
    """A bright disc on black, like a skull-stripped slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    top = np.iinfo(dtype).max if value is None else value
    return (disc * rng.uniform(0.5, 1.0, (size, size)) * top).astype(dtype)


@pytest.fixture
def png_tree(tmp_path):
    """Makes a tiny tree of PNGs: png_tree({"train": 3, ...}, root=...) -> root."""

    def make(counts, root=None, size=32):
        root = root or tmp_path / "data"
        for folder, n in counts.items():
            for i in range(n):
                write_png(root / folder / f"case_{i:03d}_slice_0.nii.png", brainish(size, seed=i))
        return root

    return make
