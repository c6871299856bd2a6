"""predict.py's pieces: seeded, temperature-controlled sampling; and the metrics (utils.py) that judge
reconstructions and samples, each against an independent computation."""

import numpy as np
import pytest

import predict
import utils
from test_prior import K, make_prior


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


def test_bits_per_code_is_the_categorical_cross_entropy():
    prior = make_prior()
    codes = np.random.default_rng(0).integers(0, K, (3, 6, 7))
    logits = np.asarray(prior(codes)).astype("float64")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, codes[..., None], -1).mean() / np.log(2)
    assert utils.bits_per_code(prior, codes, batch_size=2) == pytest.approx(expected, rel=1e-4)


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


def test_codebook_usage_perplexity():
    assert utils.codebook_usage(np.arange(8), 8) == pytest.approx({"perplexity": 8.0, "codes_used": 8})
    assert utils.codebook_usage(np.zeros(50, int), 8) == pytest.approx({"perplexity": 1.0, "codes_used": 1})


def test_ssim_psnr_and_the_bilinear_floor_equal_tensorflows():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a = rng.random((5, 40, 36, 1)).astype("float32")
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype("float32")
    np.testing.assert_allclose(utils.ssim(a, b), tf.image.ssim(a, b, max_val=1.0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(utils.psnr(a, b), tf.image.psnr(a, b, max_val=1.0).numpy(), rtol=1e-5)
    assert utils.ssim(a, a) == pytest.approx(np.ones(5))
    images = rng.random((3, 32, 32, 1)).astype("float32")
    small = tf.image.resize(images, (8, 8), method="bilinear", antialias=True)
    expected = np.clip(tf.image.resize(small, (32, 32), method="bilinear").numpy(), 0, 1)
    np.testing.assert_allclose(utils.bilinear_baseline(images, 4), expected, atol=1e-6)
