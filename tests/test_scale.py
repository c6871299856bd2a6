"""Speed and scale without changing the maths: mixed precision keeps the quantizer in float32, a mixed-precision
run still evaluates and samples, and two replicas train like one."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import modules
import predict
import train
from conftest import TINY
from run_state import Run

ROOT = Path(__file__).resolve().parents[1]


def tiny_vqvae(dtype):
    keras.utils.set_random_seed(0)
    model = modules.VQVAE(downsample=4, num_embeddings=16, embedding_dim=4, hidden_channels=8, num_res_blocks=1,
                          commitment_cost=0.25, dtype=dtype)
    model.build((None, 16, 16, 1))
    return model


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_quantizer_is_float32_and_exact(precision):
    model = tiny_vqvae(f"mixed_{precision}")
    x = np.random.default_rng(0).random((4, 16, 16, 1)).astype("float32")
    z_e = model.encoder(x)
    assert keras.backend.standardize_dtype(z_e.dtype) == precision  # the trunk computes in half precision ...
    assert model.quantizer.compute_dtype == "float32" and model.decoder.up[-1].compute_dtype == "float32"
    # ... the nearest code is chosen in float32 from the half-precision encoder output, as NumPy does it
    z = np.asarray(z_e).astype("float32")
    codebook = np.asarray(model.quantizer.codebook())
    expected = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(np.asarray(model.encode(x)), expected)
    out = model(x)
    (vq_loss,) = model.losses
    assert {keras.backend.standardize_dtype(t.dtype) for t in (out, vq_loss)} == {"float32"}
    np.testing.assert_allclose(float(vq_loss), 1.25 * np.mean((z - codebook[expected]) ** 2), rtol=1e-5)


def test_mixed_precision_trains_and_has_a_float32_twin():
    model = tiny_vqvae("mixed_bfloat16")
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(1).random((8, 16, 16, 1)).astype("float32")
    history = model.fit(x, x, epochs=2, batch_size=4, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    twin = modules.full_precision(model)
    assert {layer.compute_dtype for layer in twin._flatten_layers()} == {"float32"}
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.asarray(twin(x)), np.asarray(model(x)), atol=0.05)  # bf16 rounding only


def test_mixed_precision_prior_has_float32_logits_and_samples_through_its_twin():
    keras.utils.set_random_seed(0)
    prior = modules.PixelCNNPrior(num_embeddings=8, grid_shape=(4, 4), channels=8, num_layers=2, kernel_size=3,
                                  dtype="mixed_float16")
    prior.build((None, 4, 4))
    codes = np.random.default_rng(0).integers(0, 8, (6, 4, 4))
    assert keras.backend.standardize_dtype(prior(codes).dtype) == "float32"  # the softmax over codes runs in float32
    prior.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert type(prior.optimizer).__name__ == "LossScaleOptimizer"  # float16 needs loss scaling; Keras adds it
    assert np.isfinite(prior.fit(codes, codes, verbose=0).history["loss"][-1])
    with pytest.raises(ValueError, match="float32"):
        prior.sample(2, lambda logits, position: keras.ops.argmax(logits, axis=-1))
    twin = modules.full_precision(prior)
    sampled = np.asarray(twin.sample(2, lambda logits, position: keras.ops.argmax(logits, axis=-1)))
    assert sampled.shape == (2, 4, 4) and sampled.min() >= 0 and sampled.max() < 8


@pytest.mark.slow
def test_a_mixed_precision_xla_run_trains_evaluates_and_samples(tiny_args, tmp_path):
    args = tiny_args(tmp_path, "bf16", "--epochs", "1", "--prior-epochs", "1", "--mixed-precision", "bfloat16",
                     "--xla", "on")
    assert train.main(args) == 0
    run = tmp_path / "bf16"
    assert Run.open(run).stage("vqvae").load_model().dtype_policy.name == "mixed_bfloat16"
    assert predict.main(["--run", str(run), "--num-samples", "2", "--realism-samples", "0"]) == 0
    assert (run / "samples.png").is_file()


def train_process(demo_dir, runs, name, *extra):
    args = ["--data-dir", str(demo_dir), "--runs-dir", str(runs), "--name", name, "--epochs", "2",
            "--prior-epochs", "2", *TINY, *extra]
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def losses(path, column="loss"):
    return np.array([float(row[column]) for row in csv.DictReader(open(path))])


@pytest.mark.slow
def test_two_replicas_train_like_one(demo_dir, tmp_path):
    """Mirrored over 2 logical CPUs, each replica gets half of every batch; the all-reduced gradient, and so the
    whole training curve, must equal the 1-replica run's up to float rounding."""
    # without --prior-augment: its random shifts are drawn in the input pipeline, which the strategy distributes
    # (over 2 replicas the prior's losses differed by 0.3%: other shifts, not other arithmetic)
    one = train_process(demo_dir, tmp_path, "one", "--devices", "1", "--prior-augment", "0")
    two = train_process(demo_dir, tmp_path, "two", "--devices", "2", "--prior-augment", "0")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "2 replica(s) on /cpu:0, /cpu:1" in two.stdout
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["vqvae"]["hardware"].startswith("2 replica(s)")
    assert "float32; XLA off" in metrics["prior"]["hardware"]
    for csv_name, column in [("history.csv", "loss"), ("history.csv", "val_ssim"),
                             ("prior_history.csv", "loss"), ("prior_history.csv", "val_loss")]:
        np.testing.assert_allclose(losses(tmp_path / "two" / csv_name, column),
                                   losses(tmp_path / "one" / csv_name, column), rtol=2e-3, err_msg=csv_name)
    # the global batch is shared by the replicas: one that does not split evenly is refused before any work
    odd = train_process(demo_dir, tmp_path, "odd", "--devices", "2", "--batch-size", "15")
    assert odd.returncode == 2 and "does not split evenly over 2 replicas" in odd.stderr
    assert not (tmp_path / "odd").exists()
