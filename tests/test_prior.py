"""The PixelCNN prior as the papers define it: causal masks, no blind spot, a sampler that computes exactly what
the full model computes. Backend-agnostic: CI runs this file under TensorFlow and under JAX."""

import keras
import numpy as np
import pytest

from conftest import eager_loops
from modules import MaskedConv2D, PixelCNNPrior, guided_draw, pixelcnn_mask, top_k_draw

pytestmark = pytest.mark.any_backend

K = 7


def make_prior(layers=3, kernel_size=3, conditions=0, seed=0, grid=(6, 7), attention=0, layout=0,
               dropout=0.0):
    keras.utils.set_random_seed(seed)
    prior = PixelCNNPrior(num_embeddings=K, grid_shape=grid, channels=8, num_layers=layers,
                          kernel_size=kernel_size, num_conditions=conditions, attention_layers=attention,
                          layout_levels=layout,
                          condition_dropout=dropout)
    prior.build(prior.pack_inputs((None, *grid), (None, conditions), (None, *prior.layout_shape)))
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


@pytest.mark.parametrize("conditions, attention", [(0, 0), (2, 1)])
def test_two_level_sampler_draws_the_layout_then_the_codes_with_the_full_models_logits(conditions, attention):
    prior = make_prior(layers=2, conditions=conditions, attention=attention, grid=(6, 8), layout=3)
    condition = np.random.default_rng(2).normal(size=(2, conditions)).astype("float32") if conditions else None
    seen, drawn = {}, {}

    def draw(logits, position):
        seen[int(position)] = np.asarray(logits)
        drawn[int(position)] = np.asarray(keras.random.categorical(logits, 1, seed=int(position) + 3)[:, 0])
        return drawn[int(position)]

    with eager_loops():
        codes = np.asarray(prior.sample(2, draw, condition))
    assert sorted(seen) == list(range(48 + 12))  # the 3x4 layout is numbered after the 6x8 codes
    layout = np.stack([drawn[48 + cell] for cell in range(12)], axis=1).reshape(2, 3, 4)
    full = prior([codes, condition, layout] if conditions else [codes, layout])
    assert full["layout"].shape == (2, 3, 4, 3)
    for position, logits in seen.items():
        expected = (full["codes"][:, position // 8, position % 8] if position < 48 else
                    full["layout"][:, (position - 48) // 4, (position - 48) % 4])
        np.testing.assert_allclose(logits, np.asarray(expected), rtol=1e-4, atol=1e-4)
    seen.clear()
    with eager_loops():  # a layout given: only the codes are drawn, with the same logits, so the same codes
        again = np.asarray(prior.sample(2, draw, condition, layout=layout))
    assert sorted(seen) == list(range(48))
    np.testing.assert_array_equal(again, codes)


def test_two_level_prior_sees_the_layout_below_a_code_and_the_layout_prior_is_causal():
    prior = make_prior(layers=2, grid=(8, 8), layout=3)
    rng = np.random.default_rng(1)
    codes, layout = rng.integers(0, K, (1, 8, 8)), rng.integers(0, 3, (1, 4, 4))
    base = prior([codes, layout])
    other = layout.copy()
    other[0, 2, 2] = (other[0, 2, 2] + 1) % 3  # covers codes (4..5, 4..5): after code (3, 3) in raster order
    moved = prior([codes, other])
    # the layout is given whole: code (3, 3) sees the cell below-right of it, which no code before it reaches
    assert not np.allclose(np.asarray(moved["codes"])[0, 3, 3], np.asarray(base["codes"])[0, 3, 3])
    order = np.arange(16).reshape(4, 4)
    changed = np.abs(np.asarray(moved["layout"]) - np.asarray(base["layout"])).max(-1)[0] > 1e-5
    assert not changed[order <= 2 * 4 + 2].any() and changed[2, 3]  # the layout prior is causal
    codes_moved = codes.copy()
    codes_moved[0, 0, 0] = (codes[0, 0, 0] + 1) % K  # codes never reach the layout's logits
    np.testing.assert_array_equal(np.asarray(prior([codes_moved, layout])["layout"]), np.asarray(base["layout"]))


def test_conditioning_reaches_the_logits_of_every_position():
    prior = make_prior(conditions=2)
    codes = np.random.default_rng(0).integers(0, K, (1, 6, 7))
    a = np.asarray(prior([codes, np.array([[0.0, 1.0]], "float32")]))
    b = np.asarray(prior([codes, np.array([[1.0, 0.0]], "float32")]))
    again = np.asarray(prior([codes, np.array([[0.0, 1.0]], "float32")]))
    np.testing.assert_array_equal(again, a)  # the same condition, the same logits
    assert (np.abs(a - b).max(-1) > 1e-4).all()  # another condition moves every position's, the first one's too


@pytest.mark.parametrize("layout, dropout", [(0, 0.0), (3, 0.1)])
def test_prior_keras_round_trip(tmp_path, layout, dropout):
    prior = make_prior(conditions=2, attention=1, layout=layout, grid=(6, 8), dropout=dropout)
    codes = np.random.default_rng(0).integers(0, K, (2, 6, 8))
    inputs = [codes, np.ones((2, 2), "float32")] + [np.ones((2, 3, 4), "int32")] * bool(layout)
    prior.save(tmp_path / "prior.keras")
    loaded = keras.saving.load_model(tmp_path / "prior.keras")
    assert loaded.get_config() == prior.get_config()
    for output, expected in zip(keras.tree.flatten(loaded(inputs)), keras.tree.flatten(prior(inputs))):
        np.testing.assert_array_equal(np.asarray(output), np.asarray(expected))


@pytest.mark.parametrize("conditions, layout", [(0, 0), (2, 0), (0, 3), (2, 3)])
def test_pack_inputs_is_the_inverse_of_split_inputs(conditions, layout):
    prior = make_prior(layers=1, conditions=conditions, layout=layout, grid=(6, 8))
    codes, condition, grid = np.zeros((1, 6, 8), "int32"), np.ones((1, 2), "float32"), np.ones((1, 3, 4), "int32")
    packed = prior.pack_inputs(codes, condition, grid)
    assert (packed is codes) == (not conditions and not layout)  # the codes alone when nothing else is used
    split = prior._split_inputs(packed)
    assert split[0] is codes and (split[1] is not None) == bool(conditions) and (split[2] is grid) == bool(layout)


@pytest.mark.parametrize("layout", [0, 3])
def test_pack_targets_has_the_structure_of_the_outputs(layout):
    prior = make_prior(layers=1, layout=layout, grid=(6, 8))
    codes, grid = np.zeros((1, 6, 8), "int32"), np.ones((1, 3, 4), "int32")
    outputs = prior(prior.pack_inputs(codes, None, grid))
    targets = prior.pack_targets(codes, grid)
    keras.tree.assert_same_structure(targets, outputs)
    for target, output in zip(keras.tree.flatten(targets), keras.tree.flatten(outputs)):
        assert output.shape == (*target.shape, (K, 3)[target is grid])


def test_condition_dropout_hides_the_depth_of_some_grids_in_training_only():
    prior = make_prior(conditions=2, dropout=0.5)
    codes = np.repeat(np.random.default_rng(0).integers(0, K, (1, 6, 7)), 64, axis=0)
    condition = np.tile(np.array([[0.3, 0.9]], "float32"), (64, 1))
    conditioned = np.asarray(prior([codes[:1], condition[:1]]))
    unconditioned = np.asarray(prior([codes[:1], np.zeros((1, 2), "float32")]))
    trained = np.asarray(prior([codes, condition], training=True))
    hidden = np.array([np.allclose(t, unconditioned[0], atol=1e-5) for t in trained])
    shown = np.array([np.allclose(t, conditioned[0], atol=1e-5) for t in trained])
    assert (hidden | shown).all() and 10 < hidden.sum() < 54  # about half of 64, each grid one or the other
    np.testing.assert_allclose(np.asarray(prior([codes, condition])), np.repeat(conditioned, 64, 0), atol=1e-5)


@pytest.mark.parametrize("layout", [0, 3])
def test_guided_sampling_draws_from_the_guided_logits_and_ties_the_unconditioned_twins(layout):
    prior = make_prior(layers=2, conditions=2, grid=(6, 8), layout=layout, dropout=0.1)
    condition = np.random.default_rng(2).normal(size=(2, 2)).astype("float32")
    both = np.concatenate([condition, np.zeros_like(condition)])
    seen = {}

    def draw(logits, position):
        seen[int(position)] = np.asarray(logits)
        return keras.random.categorical(logits, 1, seed=int(position) + 3)[:, 0]

    with eager_loops():
        codes = np.asarray(prior.sample(4, guided_draw(draw, 3.0), both))
    np.testing.assert_array_equal(codes[:2], codes[2:])  # the twins carry the same codes
    inputs = [codes, both]
    if layout:  # the layouts drawn: the same draws again from the guided logits recorded at positions 48 on
        layouts = np.stack([np.asarray(keras.random.categorical(seen[48 + c], 1, seed=48 + c + 3)[:, 0])
                            for c in range(12)], axis=1).reshape(2, 3, 4)
        inputs = [codes, both, np.concatenate([layouts, layouts])]
    full = prior(inputs)
    full = np.asarray(full["codes"] if layout else full)
    for position in range(48):
        c, u = full[:2, position // 8, position % 8], full[2:, position // 8, position % 8]
        np.testing.assert_allclose(seen[position], u + 3.0 * (c - u), rtol=1e-4, atol=1e-4)


def test_top_k_sampling_draws_only_among_the_k_most_likely_codes():
    logits = keras.ops.convert_to_tensor(np.random.default_rng(4).normal(size=(64, K)).astype("float32"))
    seen = {}

    def draw(masked, position):
        seen["logits"] = np.asarray(masked)
        return keras.random.categorical(masked, 1, seed=int(position))[:, 0]

    codes = np.asarray(top_k_draw(draw, 3)(logits, 7))
    top3 = np.argsort(-np.asarray(logits), axis=1)[:, :3]
    assert all(code in row for code, row in zip(codes, top3))  # 64 draws, none outside each row's top 3
    kept = seen["logits"] > -1e8
    assert (kept.sum(axis=1) == 3).all() and np.array_equal(np.sort(np.flatnonzero(kept[0])), np.sort(top3[0]))
    np.testing.assert_array_equal(seen["logits"][kept], np.asarray(logits)[kept])  # the kept logits unchanged
    np.asarray(top_k_draw(draw, K + 5)(logits, 7))  # k beyond K: every code kept
    np.testing.assert_array_equal(seen["logits"], np.asarray(logits))
    greedy = lambda masked, position: keras.ops.argmax(masked, axis=-1)
    np.testing.assert_array_equal(np.asarray(top_k_draw(greedy, 1)(logits, 0)), np.argmax(np.asarray(logits), 1))
