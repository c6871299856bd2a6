"""The compiled training steps as XLA receives them, and a tiny fit and sample on the current backend (CI runs this
file under TensorFlow and under JAX).

A gather's gradient is a scatter-add, which XLA runs hundreds of times slower on GPUs when a batch of code grids
sends 100k+ indices into a few hundred rows: a training step 165x slower than it should be, invisible on a CPU.
These tests read the lowered step instead of timing it, so the regression cannot come back unseen here.
"""

import dataclasses

import keras
import numpy as np
import pytest

import modules
import run_state
import train
from conftest import BACKEND, compiled

pytestmark = pytest.mark.any_backend

CONFIG = dataclasses.replace(run_state.Config(), image_size=32, hidden_channels=8, num_res_blocks=1, num_embeddings=16,
                             embedding_dim=4, prior_channels=8, prior_layers=2, prior_kernel_size=3,
                             prior_attention_layers=1, prior_layout_levels=4)  # the prior with all it can have


def lowered_train_step(model, x, y) -> str:
    """The text of a compiled Keras model's training step as handed to XLA (StableHLO under JAX, HLO under TF)."""
    model.optimizer.build(model.trainable_variables)
    if BACKEND == "jax":
        import jax

        state = tuple([v.value for v in variables] for variables in (
            model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
            model.metrics_variables))
        return jax.jit(model.train_step).lower(state, (x, y)).as_text()
    import tensorflow as tf

    step = tf.function(lambda x, y: model.train_step((x, y)), jit_compile=True)
    x, y = tf.nest.map_structure(tf.constant, (x, y))
    return step.experimental_get_compiler_ir(x, y)(stage="hlo")


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_no_scatter_in_the_compiled_vqvae_and_prior_training_steps(dtype):
    images = np.random.default_rng(0).random((4, 32, 32, 1)).astype("float32")
    vqvae = modules.new_vqvae(CONFIG, steps_per_epoch=1, dtype=dtype)
    text = lowered_train_step(vqvae, images, images)
    assert "dot" in text and "scatter" not in text.lower()  # the lookup is a matmul, its gradient too

    codes = np.random.default_rng(0).integers(0, CONFIG.num_embeddings, (4, 8, 8)).astype("int32")
    prior = modules.new_prior(CONFIG, steps_per_epoch=1, dtype=dtype)  # conditioned on depth, as by default
    depths = np.asarray(modules.slice_position_features(np.linspace(0, 1, 4), CONFIG.prior_position_frequencies))
    layouts = np.asarray(vqvae.layout(codes, CONFIG.prior_layout_levels))  # (4, 4, 4): two levels
    text = lowered_train_step(prior, (codes, depths, layouts), {"codes": codes, "layout": layouts})
    assert "dot" in text and "scatter" not in text.lower()


def test_the_check_sees_a_scatter_when_there_is_one():
    """The test above could pass by reading the wrong text: a gather-gradient step must show a scatter."""

    class Gather(keras.Model):
        def build(self, input_shape):
            self.table = self.add_weight(shape=(16, 4))

        def call(self, indices):
            return keras.ops.take(self.table, indices, axis=0)

    model = Gather()
    model.compile(optimizer="sgd", loss="mse")
    model(np.zeros((2,), "int32"))
    assert "scatter" in lowered_train_step(model, np.array([1, 3], "int32"), np.zeros((2, 4), "float32")).lower()


def test_a_tiny_fit_with_codebook_restarts_then_a_compiled_sample():
    rng = np.random.default_rng(0)
    images = rng.random((16, 32, 32, 1)).astype("float32")
    vqvae = modules.new_vqvae(CONFIG, steps_per_epoch=4)
    dead = np.asarray(vqvae.quantizer.codebook()) + 100.0  # every code far away: none is picked
    vqvae.quantizer.set_codebook(dead)
    history = vqvae.fit(images, images, batch_size=4, epochs=2, verbose=0,
                        callbacks=[train.RestartUnusedCodes(images, seed=0)])
    assert np.all(np.isfinite(history.history["loss"]))
    moved = np.abs(np.asarray(vqvae.quantizer.codebook()) - dead).max(axis=1) > 50.0
    assert moved.sum() >= CONFIG.num_embeddings - 2  # the unused ones moved onto encoder outputs before epoch 2

    codes = np.asarray(vqvae.encode(images)).astype("int32")  # (16, 8, 8)
    prior = modules.new_prior(CONFIG, steps_per_epoch=4)
    features = np.asarray(modules.slice_position_features(np.linspace(0, 1, 16), CONFIG.prior_position_frequencies))
    layouts = np.asarray(vqvae.layout(codes, CONFIG.prior_layout_levels))
    prior.fit([codes, features, layouts], {"codes": codes, "layout": layouts}, batch_size=4, epochs=1, verbose=0)
    argmax = lambda logits, position: keras.ops.argmax(logits, -1)  # noqa: E731
    greedy = np.asarray(compiled(lambda condition: prior.sample(3, argmax, condition))(features[:3]))
    layout = np.asarray(compiled(lambda condition: prior.layout_prior.sample(3, argmax, condition))(features[:3]))
    assert greedy.shape == (3, 8, 8) and layout.shape == (3, 4, 4)
    # exact on this backend: a greedy sample is a fixed point of the full model's argmax, at both levels
    logits = prior([greedy, features[:3], layout])
    np.testing.assert_array_equal(np.asarray(keras.ops.argmax(logits["codes"], axis=-1)), greedy)
    np.testing.assert_array_equal(np.asarray(keras.ops.argmax(logits["layout"], axis=-1)), layout)
    assert np.asarray(vqvae.decode(greedy)).shape == (3, 32, 32, 1)
