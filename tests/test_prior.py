"""The PixelCNN prior as the papers define it: causal masks, no blind spot, a sampler that computes exactly what
the full model computes. Backend-agnostic: CI runs this file under TensorFlow and under JAX."""

import keras
import numpy as np
import pytest

from conftest import eager_loops
from modules import MaskedConv2D, PixelCNNPrior, pixelcnn_mask

pytestmark = pytest.mark.any_backend

K = 7


def make_prior(layers=3, kernel_size=3, conditions=0, seed=0, grid=(6, 7), attention=0):
    keras.utils.set_random_seed(seed)
    prior = PixelCNNPrior(num_embeddings=K, grid_shape=grid, channels=8, num_layers=layers,
                          kernel_size=kernel_size, num_conditions=conditions, attention_layers=attention)
    prior.build([(None, *grid), (None, conditions)] if conditions else (None, *grid))
    rng = np.random.default_rng(seed)  # weights far from initial so every path carries signal
    for weight in prior.weights:
        weight.assign(rng.normal(0, 0.4, weight.shape).astype("float32"))
    return prior


def test_masks_a_and_b():
    a = pixelcnn_mask((3, 5), "A")
    np.testing.assert_array_equal(a, [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    b = pixelcnn_mask((3, 5), "B")
    np.testing.assert_array_equal(b, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(pixelcnn_mask((1, 3), "A"), [[1, 0, 0]])


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_conv_ignores_masked_weights_and_sees_only_the_past(mask_type):
    layer = MaskedConv2D(2, 3, mask_type)
    x = np.random.default_rng(0).normal(size=(1, 5, 5, 1)).astype("float32")
    before = np.asarray(layer(x))
    kernel = layer.kernel.numpy()
    kernel[2] += 5.0  # the row below the centre is masked: changing it changes nothing
    kernel[1, 2] += 5.0  # right of the centre is masked
    layer.kernel.assign(kernel)
    np.testing.assert_allclose(np.asarray(layer(x)), before, atol=1e-6)
    x2 = x.copy()
    x2[0, 2, 2] += 1.0  # the centre pixel: seen by B, not by A
    changed = not np.allclose(np.asarray(layer(x2))[0, 2, 2], before[0, 2, 2])
    assert changed == (mask_type == "B")


@pytest.mark.parametrize("kernel_size, mask_type", [((5, 5), "V"), ((3, 3), "A"), ((5, 5), "B"), ((1, 5), "A"),
                                                    ((1, 3), "B"), ((3, 5), "V")])
def test_masked_conv_convolves_only_the_kept_part_with_the_same_result(kernel_size, mask_type):
    layer = MaskedConv2D(3, kernel_size, mask_type)
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 4)).astype("float32")
    out = np.asarray(layer(x))
    expected = np.asarray(keras.ops.conv(x, layer.masked_kernel(), padding="same") + layer.bias)
    assert out.shape == (2, 7, 6, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def raster_influence(prior, codes, position):
    """Which output positions change when the code at `position` changes."""
    base = np.asarray(prior(codes))
    other = codes.copy()
    other[(0, *position)] = (other[(0, *position)] + 1) % K
    return np.abs(np.asarray(prior(other)) - base).max(-1)[0] > 1e-5


@pytest.mark.parametrize("attention", [0, 1])
def test_prior_is_causal_in_raster_order_without_blind_spot(attention):
    prior = make_prior(layers=3, grid=(8, 8), attention=attention)
    codes = np.random.default_rng(1).integers(0, K, (1, 8, 8))
    i, j = 4, 3
    changed = raster_influence(prior, codes, (i, j))
    order = np.arange(64).reshape(8, 8)
    assert not changed[order <= i * 8 + j].any(), "a logit at or before the changed code moved"
    assert changed[i, j + 1] and changed[i + 1, j] and changed[i + 1, j - 1]
    # no blind spot: the code above-right of a position reaches it (a plain masked-conv stack misses this)
    assert raster_influence(prior, codes, (i - 1, j + 1))[i, j]
    assert raster_influence(prior, codes, (i - 1, j + 2))[i, j]
    # 3 layers of 3x3 reach 4 rows up; attention reaches every code before
    assert raster_influence(prior, codes, (0, 7))[i, j] == bool(attention)


def test_attention_starts_as_the_identity():
    """A new attention layer's output projection is zero: the prior computes what it would without it."""
    attending = PixelCNNPrior(num_embeddings=K, grid_shape=(6, 7), channels=8, num_layers=2, kernel_size=3,
                              attention_layers=2)
    plain = PixelCNNPrior(num_embeddings=K, grid_shape=(6, 7), channels=8, num_layers=2, kernel_size=3)
    for prior in (attending, plain):
        prior.build((None, 6, 7))
    shared = {weight.path.split("/", 1)[1]: weight for weight in attending.weights}
    for weight in plain.weights:  # the same weights where both have them
        weight.assign(shared[weight.path.split("/", 1)[1]])
    codes = np.random.default_rng(0).integers(0, K, (2, 6, 7))
    np.testing.assert_allclose(np.asarray(attending(codes)), np.asarray(plain(codes)), atol=1e-6)
    assert len(attending.weights) == len(plain.weights) + 8  # 2 layers x (qkv, out) x (kernel, bias)


@pytest.mark.parametrize("kernel_size, conditions, attention", [(3, 0, 0), (5, 0, 0), (3, 2, 0), (3, 2, 2)])
def test_fast_sampler_computes_the_same_logits_as_the_full_model(kernel_size, conditions, attention):
    prior = make_prior(layers=3, kernel_size=kernel_size, conditions=conditions, attention=attention)
    condition = np.random.default_rng(2).normal(size=(2, conditions)).astype("float32") if conditions else None
    seen = {}

    def draw(logits, position):  # eager: records the logits the sampler used at each position
        seen[int(position)] = np.asarray(logits)
        return keras.random.categorical(logits, 1, seed=int(position) + 3)[:, 0]

    with eager_loops():
        codes = np.asarray(prior.sample(2, draw, condition))
    full = np.asarray(prior([codes, condition] if conditions else codes))  # (2, 6, 7, K)
    assert sorted(seen) == list(range(42))
    for position, logits in seen.items():
        np.testing.assert_allclose(logits, full[:, position // 7, position % 7], rtol=1e-4, atol=1e-4)


def test_conditioning_changes_the_logits():
    prior = make_prior(conditions=2)
    codes = np.random.default_rng(0).integers(0, K, (1, 6, 7))
    a = np.asarray(prior([codes, np.array([[0.0, 1.0]], "float32")]))
    b = np.asarray(prior([codes, np.array([[1.0, 0.0]], "float32")]))
    assert not np.allclose(a, b)


def test_prior_keras_round_trip(tmp_path):
    prior = make_prior(conditions=2, attention=1)
    codes = np.random.default_rng(0).integers(0, K, (2, 6, 7))
    condition = np.ones((2, 2), "float32")
    prior.save(tmp_path / "prior.keras")
    loaded = keras.saving.load_model(tmp_path / "prior.keras")
    assert loaded.get_config() == prior.get_config()
    np.testing.assert_array_equal(np.asarray(loaded([codes, condition])), np.asarray(prior([codes, condition])))
