"""The VQ-VAE as the paper defines it: nearest code, straight-through gradients, both loss terms, shapes,
codebook usage, and .keras round trips. Backend-agnostic: CI runs this file under TensorFlow and under JAX."""

import keras
import numpy as np
import pytest
from keras import ops

import modules
from conftest import gradients
from modules import VQVAE, VectorQuantizer

pytestmark = pytest.mark.any_backend


def quantizer(k=16, d=4, beta=0.25, seed=0):
    keras.utils.set_random_seed(seed)
    q = VectorQuantizer(k, d, commitment_cost=beta)
    q.build((None, d))
    return q


def test_nearest_code_matches_brute_force_numpy():
    q = quantizer(k=37, d=5)
    z = np.random.default_rng(1).normal(size=(3, 7, 6, 5)).astype("float32")
    codebook = np.asarray(q.codebook())
    expected = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)  # (3, 7, 6)
    indices = np.asarray(q.nearest_indices(z))
    assert indices.shape == (3, 7, 6) and indices.dtype == np.int32
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(np.asarray(q(z)), codebook[expected], atol=1e-6)  # forward = nearest code
    np.testing.assert_allclose(np.asarray(q.embed(indices)), codebook[expected])


def test_straight_through_gradient_reaches_encoder_unchanged():
    keras.utils.set_random_seed(0)
    model = VQVAE(downsample=4, num_embeddings=8, embedding_dim=4, hidden_channels=8, num_res_blocks=1)
    x = np.random.default_rng(0).random((2, 16, 16, 1)).astype("float32")
    model.build(x.shape)
    z_e = model.encoder(x)
    z_q = model.quantizer(z_e)

    def reconstruction_loss(decoder_input):
        return ops.mean((model.decoder(decoder_input) - x) ** 2)

    (grad_encoder_output,) = gradients(lambda z: reconstruction_loss(model.quantizer(z)), z_e)
    (grad_decoder_input,) = gradients(reconstruction_loss, z_q)
    assert float(ops.max(ops.abs(grad_decoder_input))) > 0
    np.testing.assert_allclose(np.asarray(grad_encoder_output), np.asarray(grad_decoder_input), rtol=1e-6,
                               atol=1e-9)


def test_codebook_and_commitment_losses_and_their_gradients():
    beta = 0.3
    q = quantizer(k=6, d=3, beta=beta)
    z = np.random.default_rng(2).normal(size=(10, 3)).astype("float32")

    def vq_loss(inputs):
        q(inputs)
        return q.losses[0]

    nearest = np.asarray(q.codebook())[np.asarray(q.nearest_indices(z))]
    diff = z - nearest
    np.testing.assert_allclose(float(vq_loss(z)), (1 + beta) * np.mean(diff**2), rtol=1e-5)
    # commitment term only reaches the encoder output; the codes are no gradient descent's (the EMA moves them)
    (grad_z,) = gradients(vq_loss, ops.convert_to_tensor(z))
    np.testing.assert_allclose(np.asarray(grad_z), beta * 2 * diff / diff.size, rtol=1e-4, atol=1e-7)
    assert q.trainable_weights == []


def test_the_codebook_moves_by_its_moving_average_and_only_in_training():
    decay = 0.9
    keras.utils.set_random_seed(0)
    q = VectorQuantizer(4, 2, decay=decay, epsilon=1e-5)
    q.build((None, 2))
    start = np.array([[0, 0], [10, 0], [0, 10], [50, 50]], "float32")
    q.set_codebook(start)
    z = np.array([[1, 0], [0, 1], [9, 1], [11, -1], [1, 9], [-1, 11], [0.5, 0.5], [10, 2]], "float32")
    q(z)  # inference: nothing moves
    np.testing.assert_allclose(np.asarray(q.codebook()), start, atol=1e-6)
    q(z, training=True)
    # NumPy: shares and mean sums over the 8 vectors, one EMA step, Laplace smoothing of the shares
    picked = np.argmin(((z[:, None] - start[None]) ** 2).sum(-1), axis=1)  # codes 0, 0, 1, 1, 2, 2, 0, 1
    share = np.bincount(picked, minlength=4) / len(z)
    sums = np.stack([z[picked == k].sum(0) for k in range(4)]) / len(z)
    cluster = decay * 0.25 + (1 - decay) * share
    dw = decay * start / 4 + (1 - decay) * sums
    smoothed = (cluster + 1e-5) / (cluster.sum() + 4e-5) * cluster.sum()
    np.testing.assert_allclose(np.asarray(q.codebook()), dw / smoothed[:, None], rtol=1e-5, atol=1e-5)
    for _ in range(200):  # repeated, each used code settles at the mean of the vectors that pick it
        q(z, training=True)
    means = np.stack([z[picked == k].mean(0) for k in range(3)])
    np.testing.assert_allclose(np.asarray(q.codebook())[:3], means, atol=1e-3)


def test_the_vqvae_moves_its_codes_when_fit_and_not_when_used():
    keras.utils.set_random_seed(0)
    model = VQVAE(downsample=4, num_embeddings=8, embedding_dim=4, hidden_channels=8, num_res_blocks=1)
    x = np.random.default_rng(0).random((4, 16, 16, 1)).astype("float32")
    model.build(x.shape)
    start = np.asarray(model.quantizer.codebook())
    model(x), model.encode(x), model.decode(np.zeros((4, 4, 4), "int32"))
    np.testing.assert_array_equal(np.asarray(model.quantizer.codebook()), start)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, x, epochs=1, verbose=0)  # fit passes training=True down to the quantizer
    assert np.abs(np.asarray(model.quantizer.codebook()) - start).max() > 1e-4


def test_one_hot_lookup_gives_the_rows_a_gather_gives():
    """The dense lookup (its gradient is a matmul, not a scatter) returns exactly the table's rows."""
    rng = np.random.default_rng(3)
    table = rng.normal(size=(37, 5)).astype("float32") * 1e3
    indices = rng.integers(0, 37, (4, 9, 6))
    np.testing.assert_array_equal(np.asarray(modules.one_hot_lookup(ops.convert_to_tensor(table), indices)),
                                  table[indices])


@pytest.mark.parametrize("downsample", [4, 8])
def test_shapes_for_each_downsampling_factor(downsample):
    model = VQVAE(downsample=downsample, num_embeddings=8, embedding_dim=4, hidden_channels=8, num_res_blocks=1)
    x = np.random.default_rng(0).random((2, 32, 32, 1)).astype("float32")
    assert tuple(model(x).shape) == (2, 32, 32, 1)
    codes = np.asarray(model.encode(x))
    assert codes.shape == (2, 32 // downsample, 32 // downsample)
    assert codes.min() >= 0 and codes.max() < 8
    images = np.asarray(model.decode(codes))
    assert images.shape == (2, 32, 32, 1) and images.min() >= 0 and images.max() <= 1


def test_keras_file_round_trip_gives_identical_outputs(tmp_path):
    keras.utils.set_random_seed(0)
    model = VQVAE(downsample=4, num_embeddings=8, embedding_dim=4, hidden_channels=8, num_res_blocks=1,
                  commitment_cost=0.4, background=0.1)
    x = np.random.default_rng(0).random((4, 16, 16, 1)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, x, epochs=1, verbose=0)  # trained weights, not the initial ones
    model.save(tmp_path / "vqvae.keras")
    loaded = keras.saving.load_model(tmp_path / "vqvae.keras")  # no custom_objects: classes are registered
    assert isinstance(loaded, VQVAE) and loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    np.testing.assert_array_equal(np.asarray(loaded.encode(x)), np.asarray(model.encode(x)))


def test_spectral_loss_is_mse_plus_the_weighted_log_fft_amplitude_gap_as_numpy_computes_it():
    rng = np.random.default_rng(0)
    real, decoded = rng.random((2, 3, 16, 16, 1)).astype("float32")
    mse = ((decoded - real) ** 2).mean()
    log_amplitude = [np.log1p(np.abs(np.fft.fft2(x[..., 0]))) for x in (real, decoded)]
    gap = np.abs(log_amplitude[1] - log_amplitude[0]).mean()
    assert gap > 0.1
    np.testing.assert_allclose(float(modules.SpectralMSE(0.0)(real, decoded)), mse, rtol=1e-5)
    np.testing.assert_allclose(float(modules.SpectralMSE(0.3)(real, decoded)), mse + 0.3 * gap, rtol=1e-4)
    assert float(modules.SpectralMSE(0.3)(real, real)) < 1e-6
    (grad,) = gradients(lambda x: modules.SpectralMSE(0.3)(real, x), ops.zeros_like(real))  # |FFT| = 0 everywhere
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0
    with pytest.raises(ValueError, match="weight must be 0 or more"):
        modules.SpectralMSE(-1.0)


def test_a_vqvae_compiled_with_the_spectral_loss_reloads_with_it(tmp_path):
    keras.utils.set_random_seed(0)
    model = VQVAE(downsample=4, num_embeddings=8, embedding_dim=4, hidden_channels=8, num_res_blocks=1)
    x = np.random.default_rng(0).random((4, 16, 16, 1)).astype("float32")
    model.compile(optimizer="adam", loss=modules.SpectralMSE(0.25))
    model.fit(x, x, epochs=1, verbose=0)
    model.save(tmp_path / "vqvae.keras")
    loaded = keras.saving.load_model(tmp_path / "vqvae.keras")  # how a resumed run continues training
    assert isinstance(loaded.loss, modules.SpectralMSE) and loaded.loss.weight == 0.25


def test_decode_sets_the_background_to_exactly_zero_and_keeps_the_rest():
    keras.utils.set_random_seed(0)
    kwargs = dict(downsample=2, num_embeddings=8, embedding_dim=4, hidden_channels=8, num_res_blocks=1)
    plain, cleaned = VQVAE(**kwargs), VQVAE(**kwargs, background=0.02)
    plain.build((None, 16, 16, 1))
    cleaned.build((None, 16, 16, 1))
    cleaned.set_weights(plain.get_weights())
    plain.decoder.up[-1].bias.assign([0.01])  # a faint haze: most outputs just above 0
    cleaned.decoder.up[-1].bias.assign([0.01])
    codes = np.random.default_rng(0).integers(0, 8, (2, 8, 8))
    before, after = np.asarray(plain.decode(codes)), np.asarray(cleaned.decode(codes))
    faint = before < 0.02
    assert 0 < faint.mean() < 1 and (before[faint] > 0).any()
    np.testing.assert_array_equal(after[faint], 0.0)
    np.testing.assert_array_equal(after[~faint], before[~faint])


def test_layout_grid_bins_each_cells_mean_intensity_and_vqvae_layout_is_that_of_the_decoded_slice():
    images = np.random.default_rng(0).random((2, 16, 16, 1)).astype("float32") ** 3
    images[0, :8, :8] = 0.0  # a black cell: level 0
    images[1, 8:, 8:] = 1.0  # a white one: the top level, not one past it
    cell = 2 * modules.LAYOUT_POOL  # downsample 2: a cell is 4x4 px
    means = images[..., 0].reshape(2, 4, cell, 4, cell).mean(axis=(2, 4))
    layout = np.asarray(modules.layout_grid(images, downsample=2, levels=5))
    np.testing.assert_array_equal(layout, np.minimum(np.floor(means * 5), 4))
    assert layout[0, :2, :2].max() == 0 and layout[1, 2:, 2:].min() == 4 and layout.dtype == np.int32

    keras.utils.set_random_seed(0)
    vqvae = VQVAE(downsample=2, num_embeddings=8, embedding_dim=4, hidden_channels=8, num_res_blocks=1)
    vqvae.build((None, 16, 16, 1))
    codes = np.random.default_rng(1).integers(0, 8, (2, 8, 8))
    np.testing.assert_array_equal(np.asarray(vqvae.layout(codes, 5)),
                                  np.asarray(modules.layout_grid(vqvae.decode(codes), 2, 5)))


@pytest.mark.parametrize("layer", [
    VectorQuantizer(8, 4, commitment_cost=0.5, name="q"),
    modules.Encoder(8, 16, 3, 5, name="enc"),
    modules.Decoder(2, 16, 0, name="dec"),
    modules.ResidualBlock(8, 2, name="res"),
])
def test_layer_config_round_trip(layer):
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_embeddings"):
        VectorQuantizer(0, 4)
    with pytest.raises(ValueError, match="power of two"):
        VQVAE(downsample=3, num_embeddings=8, embedding_dim=4, hidden_channels=8, num_res_blocks=1)
    with pytest.raises(ValueError, match="channels"):
        VectorQuantizer(8, 4)(np.zeros((2, 5), "float32"))
    with pytest.raises(ValueError, match="background"):
        VQVAE(downsample=2, num_embeddings=8, embedding_dim=4, hidden_channels=8, num_res_blocks=1, background=1.5)




def test_restart_moves_only_unused_codes_onto_inputs():
    q = quantizer(k=8, d=2)
    codebook = np.array([[0, 0], [10, 10]] + [[100 + i, 100] for i in range(6)], "float32")
    q.set_codebook(codebook)
    z = np.array([[0.1, 0], [9, 10], [0, 0.2]], "float32")  # picks codes 0 and 1 only
    assert q.restart_unused_codes(z, seed=0) == 6
    new = np.asarray(q.codebook())
    np.testing.assert_array_equal(new[:2], codebook[:2])
    for row in new[2:]:
        assert any(np.allclose(row, v) for v in z)
