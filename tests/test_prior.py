"""The PixelCNN prior as the papers define it: causal masks, no blind spot, a sampler that computes exactly what
the full model computes, seeded and temperature-controlled sampling, and the metrics that judge samples."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import predict
import utils
from modules import MaskedConv2D, PixelCNNPrior, pixelcnn_mask

K = 7


def make_prior(layers=3, kernel_size=3, conditions=0, seed=0, grid=(6, 7)):
    keras.utils.set_random_seed(seed)
    prior = PixelCNNPrior(num_embeddings=K, grid_shape=grid, channels=8, num_layers=layers,
                          kernel_size=kernel_size, num_conditions=conditions)
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


def raster_influence(prior, codes, position):
    """Which output positions change when the code at `position` changes."""
    base = np.asarray(prior(codes))
    other = codes.copy()
    other[(0, *position)] = (other[(0, *position)] + 1) % K
    return np.abs(np.asarray(prior(other)) - base).max(-1)[0] > 1e-5


def test_prior_is_causal_in_raster_order_without_blind_spot():
    prior = make_prior(layers=3, grid=(8, 8))
    codes = np.random.default_rng(1).integers(0, K, (1, 8, 8))
    i, j = 4, 3
    changed = raster_influence(prior, codes, (i, j))
    order = np.arange(64).reshape(8, 8)
    assert not changed[order <= i * 8 + j].any(), "a logit at or before the changed code moved"
    assert changed[i, j + 1] and changed[i + 1, j] and changed[i + 1, j - 1]
    # no blind spot: the code above-right of a position reaches it (a plain masked-conv stack misses this)
    assert raster_influence(prior, codes, (i - 1, j + 1))[i, j]
    assert raster_influence(prior, codes, (i - 1, j + 2))[i, j]


@pytest.mark.parametrize("kernel_size, conditions", [(3, 0), (5, 0), (3, 2)])
def test_fast_sampler_computes_the_same_logits_as_the_full_model(kernel_size, conditions):
    prior = make_prior(layers=3, kernel_size=kernel_size, conditions=conditions)
    condition = np.random.default_rng(2).normal(size=(2, conditions)).astype("float32") if conditions else None
    seen = {}

    def draw(logits, position):  # eager: records the logits the sampler used at each position
        seen[int(position)] = np.asarray(logits)
        return tf.random.stateless_categorical(logits, 1, seed=[int(position), 3])[:, 0]

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


def test_sampler_shapes_range_seed_and_temperature():
    prior = make_prior()
    sample = lambda temperature, seed: predict.make_sampler(prior, 5, temperature, seed)().numpy()
    codes = sample(1.0, 0)
    assert codes.shape == (5, 6, 7) and codes.dtype == np.int32 and codes.min() >= 0 and codes.max() < K
    np.testing.assert_array_equal(sample(1.0, 0), codes)  # same seed, same samples
    assert not np.array_equal(sample(1.0, 1), codes)
    greedy = sample(0.0, 0)
    np.testing.assert_array_equal(greedy, np.asarray(prior(greedy)).argmax(-1))  # the argmax path
    np.testing.assert_array_equal(sample(1e-4, 5), greedy)  # temperature -> 0 tends to it


def test_prior_keras_round_trip(tmp_path):
    prior = make_prior(conditions=2)
    codes = np.random.default_rng(0).integers(0, K, (2, 6, 7))
    condition = np.ones((2, 2), "float32")
    prior.save(tmp_path / "prior.keras")
    loaded = keras.saving.load_model(tmp_path / "prior.keras")
    assert loaded.get_config() == prior.get_config()
    np.testing.assert_array_equal(np.asarray(loaded([codes, condition])), np.asarray(prior([codes, condition])))


def test_bits_per_code_is_the_categorical_cross_entropy():
    prior = make_prior()
    codes = np.random.default_rng(0).integers(0, K, (3, 6, 7))
    logits = np.asarray(prior(codes)).astype("float64")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, codes[..., None], -1).mean() / np.log(2)
    assert predict.bits_per_code(prior, codes, batch_size=2) == pytest.approx(expected, rel=1e-4)


def test_nearest_ssim_matches_brute_force():
    rng = np.random.default_rng(0)
    pool = rng.random((12, 24, 24, 1)).astype("float32")
    queries = np.concatenate([pool[:2] * 0.9, rng.random((2, 24, 24, 1)).astype("float32")])
    brute = np.array([utils.ssim(np.repeat(q[None], len(pool), 0), pool).max() for q in queries])
    np.testing.assert_allclose(utils.nearest_ssim(queries, pool, shortlist=12), brute, rtol=1e-5)
    assert utils.nearest_ssim(pool[:3], pool, shortlist=2) == pytest.approx(1.0)  # a copy is found


def test_brain_fraction():
    images = np.zeros((2, 10, 10, 1), "float32")
    images[0, :5] = 0.5
    np.testing.assert_allclose(utils.brain_fraction(images), [0.5, 0.0])
