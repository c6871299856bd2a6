"""predict.py's pieces: seeded, temperature-controlled sampling; and the metrics (utils.py) that judge
reconstructions and samples, each against an independent computation."""

import keras
import numpy as np
import pytest

import modules
import predict
import realism
import utils
from test_prior import K, make_prior


def test_sampler_shapes_range_seed_and_temperature():
    prior = make_prior()
    sample = lambda temperature, seed: predict.make_sampler(prior, temperature, seed)(5)
    codes = sample(1.0, 0)
    assert codes.shape == (5, 6, 7) and codes.dtype == np.int32 and codes.min() >= 0 and codes.max() < K
    np.testing.assert_array_equal(sample(1.0, 0), codes)  # same seed, same samples
    assert not np.array_equal(sample(1.0, 1), codes)
    sampler = predict.make_sampler(prior, 1.0, 0)
    np.testing.assert_array_equal(sampler(5, seed=1), sample(1.0, 1))  # a seed per call, one sampler
    np.testing.assert_array_equal(sampler(5, stream=2), sampler(5, stream=2))
    assert not np.array_equal(sampler(5, stream=2), codes)  # another stream of the same seed: other samples
    greedy = sample(0.0, 0)
    np.testing.assert_array_equal(greedy, np.asarray(prior(greedy)).argmax(-1))  # the argmax path
    np.testing.assert_array_equal(sample(1e-4, 5), greedy)  # temperature -> 0 tends to it


def test_a_depth_conditioned_sampler_draws_at_the_depths_given():
    prior = make_prior(conditions=4)  # slice_position_features with 2 frequencies
    sample = predict.make_sampler(prior, 0.0, 0)
    depths = np.array([0.1, 0.9, 0.1], "float32")
    greedy = sample(3, depths)
    features = np.asarray(modules.slice_position_features(depths, 2))
    np.testing.assert_array_equal(greedy, np.asarray(prior([greedy, features])).argmax(-1))  # exact under conditions
    np.testing.assert_array_equal(greedy[0], greedy[2])  # same depth, same greedy sample
    assert not np.array_equal(greedy[0], greedy[1])


def test_bits_per_code_is_the_categorical_cross_entropy():
    prior = make_prior()
    codes = np.random.default_rng(0).integers(0, K, (3, 6, 7))
    logits = np.asarray(prior(codes)).astype("float64")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, codes[..., None], -1).mean() / np.log(2)
    assert utils.bits_per_code(prior, codes, batch_size=2) == pytest.approx(expected, rel=1e-4)


def test_bits_per_code_of_a_two_level_prior_counts_the_layout_by_its_share_of_cells():
    prior = make_prior(grid=(6, 8), layout=3)
    rng = np.random.default_rng(0)
    codes, layouts = rng.integers(0, K, (3, 6, 8)), rng.integers(0, 3, (3, 3, 4))
    outputs = prior([codes, layouts])

    def nats(logits, targets):  # summed cross-entropy
        logits = np.asarray(logits, "float64")
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -np.take_along_axis(log_probs, targets[..., None], -1).sum()

    expected = (nats(outputs["codes"], codes) + nats(outputs["layout"], layouts)) / codes.size / np.log(2)
    assert utils.bits_per_code(prior, codes, layouts=layouts, batch_size=2) == pytest.approx(expected, rel=1e-4)
    assert expected > nats(outputs["codes"], codes) / codes.size / np.log(2)  # the layout's part is counted


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


def test_c2st_cannot_tell_real_from_real_and_always_tells_real_from_wrong():
    """The realism metric must be able to fail: two real sets score about 0.5, a blurred or a shuffled set about 1."""
    import dataset

    template = dataset.mni152_template()
    subjects = [dataset.demo_subject(*template, np.random.default_rng([7, s]))[0] for s in range(8)]
    slices = np.stack(subjects)[:, ::2, ::8, ::8, None].astype("float32") / 255  # 8 subjects x 16 depths, 32 px
    first, second = slices[:4].reshape(-1, 32, 32, 1), slices[4:].reshape(-1, 32, 32, 1)  # 4 other subjects each
    subject = np.repeat(np.arange(4), 16)
    same = realism.c2st(first, second, groups=(subject, subject + 4), folds=4, epochs=15, size=32)
    assert same["n_per_set"] == 64 and same["grouped"] and same["ci95"][0] < 0.5 < same["ci95"][1]
    assert same["p_value"] > 0.01  # a guessing judge's accuracy is not significant

    blurred = utils.downsized(second, 4).repeat(8, axis=1).repeat(8, axis=2)  # 4x4 blocks of 8x8 pixels
    told = realism.c2st(first, blurred, groups=(subject, subject + 4), folds=4, epochs=15, size=32)
    assert told["accuracy"] >= 0.9 and told["p_value"] < 1e-20  # 128 judgments, at least 116 right
    rng = np.random.default_rng(0)
    shuffled = np.stack([image.reshape(-1)[rng.permutation(image.size)].reshape(image.shape) for image in second])
    assert realism.c2st(first, shuffled, folds=4, epochs=15, size=32)["accuracy"] >= 0.9


def test_a_c2st_over_draws_pools_the_draws_judgments():
    """Several draws (fresh samples each) are judged one by one, as separate tests with their own seeds would judge
    them; the accuracy is over all judgments, and an image of the fixed set judged in two draws is one group."""
    rng = np.random.default_rng(0)
    second = rng.random((20, 16, 16, 1)).astype("float32")
    draws = [np.clip(second[rng.permutation(20)] + rng.normal(0, s, second.shape), 0, 1).astype("float32")
             for s in (0.1, 0.3)]
    pooled = realism.c2st(draws, second, folds=2, epochs=4, size=16, seed=5)
    alone = [realism.c2st(draw, second, folds=2, epochs=4, size=16, seed=5 + 2 * r)["accuracy"]
             for r, draw in enumerate(draws)]
    assert pooled["draws"] == alone and pooled["accuracy"] == pytest.approx(np.mean(alone))
    assert pooled["n_per_set"] == 20 and pooled["groups_per_set"] == [40, 20]  # new samples, the same real images
    subject = np.repeat(np.arange(4), 5)
    grouped = realism.c2st(draws, second, groups=([subject, subject], subject), folds=2, epochs=4, size=16)
    assert grouped["grouped"] and grouped["groups_per_set"] == [4, 4]  # the same subjects in both draws


def test_a_c2st_judges_each_draw_against_a_second_set_of_its_own_when_given_one_a_draw():
    """Other deals of real subjects: each draw has its own second set, judged as a C2ST of that pair alone would."""
    rng = np.random.default_rng(1)
    draws = [rng.random((20, 16, 16, 1)).astype("float32") for _ in range(2)]
    others = [np.clip(d + rng.normal(0, s, d.shape), 0, 1).astype("float32") for d, s in zip(draws, (0.1, 0.3))]
    pooled = realism.c2st(draws, others, folds=2, epochs=4, size=16, seed=5)
    alone = [realism.c2st(d, o, folds=2, epochs=4, size=16, seed=5 + 2 * r)["accuracy"]
             for r, (d, o) in enumerate(zip(draws, others))]
    assert pooled["draws"] == alone and pooled["groups_per_set"] == [40, 40]  # new images on both sides each draw
    with pytest.raises(ValueError, match="one second set a draw: 2 draws, 1 second sets"):
        realism.c2st(draws, others[:1], folds=2, epochs=4, size=16)


def test_a_reused_judge_judges_as_a_new_one():
    """The C2ST compiles one judge per image size and resets it for every fold: weights, dropout seed and Adam's
    state must all be back to a new judge's, or a second test would start from what the first one learned."""
    rng = np.random.default_rng(0)
    first = rng.random((24, 16, 16, 1)).astype("float32")
    second = np.clip(first[::-1] + rng.normal(0, 0.2, first.shape), 0, 1).astype("float32")
    realism._JUDGES.pop(16, None)
    new = realism.c2st(first, second, epochs=4, size=16, seed=3)  # builds the judge
    assert 16 in realism._JUDGES
    realism.c2st(second, first, epochs=4, size=16, seed=9)  # trains it on something else
    assert realism.c2st(first, second, epochs=4, size=16, seed=3) == new


def test_each_fold_is_judged_by_several_judges_the_first_seeded_as_a_judge_alone(monkeypatch):
    """judges=J draws J judges per fold, the first with the seed a judge alone would have (so judges=1 is the test
    of before), the others apart from every other fold's and draw's: one judge's verdict hangs on its draw."""
    rng = np.random.default_rng(0)
    first = rng.random((24, 16, 16, 1)).astype("float32")
    second = np.clip(first[::-1] + rng.normal(0, 0.3, first.shape), 0, 1).astype("float32")
    seeds, set_seed = [], keras.utils.set_random_seed
    monkeypatch.setattr(keras.utils, "set_random_seed", lambda seed: seeds.append(seed) or set_seed(seed))
    one = realism.c2st(first, second, folds=2, epochs=3, size=16, seed=4, judges=1)
    assert seeds == [4, 5]
    seeds.clear()
    three = realism.c2st([first, first], second, folds=2, epochs=3, size=16, seed=4, judges=3)
    assert seeds == [4, 1004, 2004, 5, 1005, 2005, 6, 1006, 2006, 7, 1007, 2007]  # two draws of two folds
    assert realism.c2st([first, first], second, folds=2, epochs=3, size=16, seed=4, judges=3) == three
    assert one["n_per_set"] == three["n_per_set"] == 24
    assert one["judges_alone"] == [one["accuracy"]]  # one judge: its verdicts are the test's
    # the first of three judges learns and judges exactly as it would alone
    assert realism.c2st(first, second, folds=2, epochs=3, size=16, seed=4, judges=3)["judges_alone"][0] == \
        one["accuracy"]
    assert len(three["judges_alone"]) == 3 and all(0 <= a <= 1 for a in three["judges_alone"])
    with pytest.raises(ValueError, match="at least one judge"):
        realism.c2st(first, second, folds=2, epochs=3, size=16, judges=0)


@pytest.mark.parametrize("size", [16, 17])
def test_the_judges_first_layer_is_a_stride_2_convolution_with_conv2ds_initial_weights(size):
    """PatchConv on first_layer_patches (a speed-up) computes what layers.Conv2D(8, 3, strides=2, padding="same")
    computes on the image, from the same initial weights under the same seed, odd sizes and padding included."""
    images = np.random.default_rng(0).random((3, size, size, 1)).astype("float32")
    keras.utils.set_random_seed(5)
    conv = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")
    keras.utils.set_random_seed(5)
    patch_conv = realism.PatchConv(8)
    expected, got = np.asarray(conv(images)), np.asarray(patch_conv(realism.first_layer_patches(images)))
    np.testing.assert_array_equal(np.asarray(patch_conv.kernel), np.asarray(conv.kernel))
    assert got.shape == expected.shape == (3, (size + 1) // 2, (size + 1) // 2, 8)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_cluster_bootstrap_interval_widens_with_fewer_groups():
    rng = np.random.default_rng(0)
    outcomes = [rng.random(200) < 0.7, rng.random(200) < 0.7]
    alone = realism.cluster_bootstrap_interval(outcomes, [np.arange(200), np.arange(200)], rng)
    mean = np.concatenate(outcomes).mean()
    assert alone[0] < mean < alone[1] and alone[1] - alone[0] < 0.12  # about +-1.96 sqrt(0.21 / 400)
    subject = [np.repeat(np.arange(4), 50)] * 2
    alike = [np.repeat(rng.random(4) < 0.7, 50), np.repeat(rng.random(4) < 0.7, 50)]  # a subject judged as one
    wide = realism.cluster_bootstrap_interval(alike, subject, rng)
    assert wide[1] - wide[0] > 0.3


def test_the_p_value_is_the_binomial_tail_of_the_judgments():
    from scipy import stats

    rng = np.random.default_rng(0)
    first, second = rng.random((40, 16, 16, 1)), rng.random((40, 16, 16, 1))
    result = realism.c2st(first, second, folds=2, epochs=2, size=16)
    right = round(result["accuracy"] * 80)  # 40 judged in each set
    assert result["p_value"] == pytest.approx(sum(stats.binom.pmf(k, 80, 0.5) for k in range(right, 81)))


def test_images_reach_the_judge_as_8_bit_pngs_do():
    images = np.array([0.0, 0.5, 1 / 255 + 1e-4, 1.2, -0.1], "float32").reshape(1, 5, 1, 1)
    levels = np.array([0, 128, 1, 255, 0], "float32") / np.float32(255)
    np.testing.assert_array_equal(realism.as_8_bit(images).ravel(), levels)
    real = (np.arange(256, dtype="float32") / np.float32(255)).reshape(1, 16, 16, 1)  # as dataset.load_images reads
    np.testing.assert_array_equal(realism.as_8_bit(real), real)  # slices read at their stored size: unchanged


def test_interior_shuffled_slices_keep_outline_and_intensities_and_lose_the_anatomy():
    import dataset

    template = dataset.mni152_template()
    volume = dataset.demo_subject(*template, np.random.default_rng([3, 0]))[0]  # (32, 256, 256) uint8
    slices = volume[8:24:4, ::2, ::2, None].astype("float32") / 255  # 4 mid-depth slices at 128 px
    shuffled = realism.interior_shuffled(slices, np.random.default_rng(0))
    brain = slices > utils.BRAIN_THRESHOLD
    np.testing.assert_array_equal(shuffled > utils.BRAIN_THRESHOLD, brain)  # the outline, exactly
    np.testing.assert_array_equal(shuffled[~brain], slices[~brain])  # the background untouched
    for before, after in zip(slices, shuffled):
        np.testing.assert_array_equal(np.sort(after.ravel()), np.sort(before.ravel()))  # the same intensities
        moved = np.mean(after[before > utils.BRAIN_THRESHOLD] != before[before > utils.BRAIN_THRESHOLD])
        assert moved > 0.5  # most of the brain's pixels are somewhere else
