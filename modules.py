"""The models: a VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning").

Backend-agnostic Keras 3: only `keras`, `keras.ops` and `keras.random` appear here, so the same file trains under
TensorFlow (the scripts) and JAX (GPU checks with KERAS_BACKEND=jax). Every class is registered serializable with
a complete get_config, so `keras.saving.load_model("vqvae.keras")` needs no custom_objects.

Shapes at the defaults (256 px, downsample 4, D = 64, K = 512):
    images (N, 256, 256, 1) -> Encoder -> z_e (N, 64, 64, 64) -> VectorQuantizer -> z_q (N, 64, 64, 64)
    -> Decoder -> reconstructions (N, 256, 256, 1); the code grid is the (N, 64, 64) int32 indices of z_q.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

PACKAGE = "brainvq"


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class VectorQuantizer(layers.Layer):
    """Maps each D-vector of its input to the nearest of `num_embeddings` codebook vectors (squared Euclidean).

    Forward, the output is the nearest code e_k; backward, the gradient passes straight through to the input
    (z_e + stop_gradient(e_k - z_e)). During training it adds the paper's loss
        || stop_gradient(z_e) - e_k ||^2  +  commitment_cost * || z_e - stop_gradient(e_k) ||^2
    (codebook loss: moves the codes towards the encoder outputs; commitment loss: keeps the encoder near its codes).

    Example: inputs (8, 16, 16, 32) with num_embeddings=128, embedding_dim=32 give outputs (8, 16, 16, 32) and
    `nearest_codes(inputs)[1]`, the code indices, (8, 16, 16) int32 in [0, 128).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25, **kwargs):
        super().__init__(**kwargs)
        _check_positive(num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        if commitment_cost < 0:
            raise ValueError(f"commitment_cost must be >= 0, got {commitment_cost}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost

    def build(self, input_shape):
        if input_shape[-1] != self.embedding_dim:
            raise ValueError(f"VectorQuantizer expects inputs with {self.embedding_dim} channels, got {input_shape}")
        # (K, D): row k is code e_k. Uniform in +-sqrt(3/D) puts the codes at the scale of unit-variance inputs.
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.num_embeddings, self.embedding_dim),
            initializer=keras.initializers.VarianceScaling(distribution="uniform"), trainable=True)

    def nearest_indices(self, inputs):
        """(..., D) -> (...) int32 index of the nearest code."""
        flat = ops.reshape(inputs, (-1, self.embedding_dim))  # (M, D)
        embeddings = ops.cast(self.embeddings, flat.dtype)
        # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2, without materialising an (M, K, D) tensor.
        distances = (ops.sum(flat**2, axis=1, keepdims=True) - 2.0 * ops.matmul(flat, ops.transpose(embeddings))
                     + ops.sum(embeddings**2, axis=1)[None, :])  # (M, K)
        indices = ops.cast(ops.argmin(distances, axis=1), "int32")
        return ops.reshape(indices, ops.shape(inputs)[:-1])

    def embed(self, indices):
        """(...) int code indices -> (..., D) codebook vectors."""
        return ops.take(self.embeddings, ops.cast(indices, "int32"), axis=0)

    def nearest_codes(self, inputs):
        """(..., D) -> (nearest codes (..., D), indices (...)); no loss, no gradient trick."""
        indices = self.nearest_indices(inputs)
        return ops.cast(self.embed(indices), inputs.dtype), indices

    def restart_unused_codes(self, inputs, seed=None) -> int:
        """Moves every code that no vector of `inputs` (..., D) picks onto a randomly chosen input vector, so
        dead codes rejoin training (the standard remedy for codebook collapse). Returns how many moved."""
        flat = ops.reshape(ops.convert_to_tensor(inputs, "float32"), (-1, self.embedding_dim))
        used = ops.bincount(self.nearest_indices(flat), minlength=self.num_embeddings) > 0  # (K,)
        picks = keras.random.randint((self.num_embeddings,), 0, ops.shape(flat)[0], seed=seed)
        self.embeddings.assign(ops.where(used[:, None], self.embeddings, ops.take(flat, picks, axis=0)))
        return int(self.num_embeddings - ops.sum(ops.cast(used, "int32")))

    def call(self, inputs):
        quantized, _ = self.nearest_codes(inputs)
        codebook_loss = ops.mean((ops.stop_gradient(inputs) - quantized) ** 2)
        commitment_loss = ops.mean((inputs - ops.stop_gradient(quantized)) ** 2)
        self.add_loss(codebook_loss + self.commitment_cost * commitment_loss)
        return inputs + ops.stop_gradient(quantized - inputs)  # straight-through estimator

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "commitment_cost": self.commitment_cost}


def codebook_usage(indices, num_embeddings: int) -> dict:
    """Perplexity (exp of the entropy of code frequencies: K when all codes are used equally, 1 when one code
    takes everything) and the number of codes used at least once, over an array of indices."""
    counts = ops.bincount(ops.reshape(ops.cast(indices, "int32"), (-1,)), minlength=num_embeddings)
    probs = ops.cast(counts, "float32") / ops.cast(ops.maximum(ops.sum(counts), 1), "float32")
    entropy = -ops.sum(probs * ops.log(ops.maximum(probs, 1e-12)))
    return {"perplexity": float(ops.exp(entropy)), "codes_used": int(ops.sum(ops.cast(counts > 0, "int32")))}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResidualBlock(layers.Layer):
    """x + conv1x1(relu(conv3x3(relu(x)))), the VQ-VAE paper's residual block."""

    def __init__(self, channels: int, hidden_channels: int, **kwargs):
        super().__init__(**kwargs)
        _check_positive(channels=channels, hidden_channels=hidden_channels)
        self.channels = channels
        self.hidden_channels = hidden_channels
        self.conv3 = layers.Conv2D(hidden_channels, 3, padding="same", name="conv3x3")
        self.conv1 = layers.Conv2D(channels, 1, name="conv1x1")

    def build(self, input_shape):
        _build_chain([self.conv3, self.conv1], input_shape)

    def call(self, x):
        return x + self.conv1(ops.relu(self.conv3(ops.relu(x))))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "hidden_channels": self.hidden_channels}


def _num_halvings(downsample: int) -> int:
    if not isinstance(downsample, int) or downsample < 2 or downsample & (downsample - 1):
        raise ValueError(f"downsample must be a power of two >= 2, got {downsample!r}")
    return int(math.log2(downsample))


def _build_chain(chain: list, shape) -> None:
    """Builds layers applied one after another, so weights exist before the first call (needed to reload)."""
    for layer in chain:
        layer.build(shape)
        shape = layer.compute_output_shape(shape)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Encoder(layers.Layer):
    """(N, H, W, 1) -> (N, H/f, W/f, D): log2(f) stride-2 4x4 convolutions, a 3x3 convolution, residual
    blocks, then a 1x1 convolution to the embedding dimension D."""

    def __init__(self, downsample: int = 4, hidden_channels: int = 128, num_res_blocks: int = 2,
                 embedding_dim: int = 64, **kwargs):
        super().__init__(**kwargs)
        _check_positive(hidden_channels=hidden_channels, embedding_dim=embedding_dim)
        self.downsample = downsample
        self.hidden_channels = hidden_channels
        self.num_res_blocks = num_res_blocks
        self.embedding_dim = embedding_dim
        n = _num_halvings(downsample)
        self.down = [layers.Conv2D(hidden_channels // 2 if i < n - 1 else hidden_channels, 4, strides=2,
                                   padding="same", activation="relu", name=f"down{i}") for i in range(n)]
        self.conv = layers.Conv2D(hidden_channels, 3, padding="same", name="conv")
        self.blocks = [ResidualBlock(hidden_channels, max(hidden_channels // 4, 1), name=f"res{i}")
                       for i in range(num_res_blocks)]
        self.project = layers.Conv2D(embedding_dim, 1, name="to_embedding")

    def build(self, input_shape):
        _build_chain([*self.down, self.conv, *self.blocks, self.project], input_shape)

    def call(self, images):
        x = images
        for conv in self.down:
            x = conv(x)  # (N, H/2^i, W/2^i, C)
        x = self.conv(x)
        for block in self.blocks:
            x = block(x)
        return self.project(ops.relu(x))  # (N, H/f, W/f, D)

    def get_config(self):
        return {**super().get_config(), "downsample": self.downsample, "hidden_channels": self.hidden_channels,
                "num_res_blocks": self.num_res_blocks, "embedding_dim": self.embedding_dim}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Decoder(layers.Layer):
    """(N, H/f, W/f, D) -> (N, H, W, 1): a 3x3 convolution, residual blocks, then log2(f) stride-2 transposed
    convolutions, the last one to a single linear channel (intensities; clip to [0, 1] for display)."""

    def __init__(self, downsample: int = 4, hidden_channels: int = 128, num_res_blocks: int = 2, **kwargs):
        super().__init__(**kwargs)
        _check_positive(hidden_channels=hidden_channels)
        self.downsample = downsample
        self.hidden_channels = hidden_channels
        self.num_res_blocks = num_res_blocks
        n = _num_halvings(downsample)
        self.conv = layers.Conv2D(hidden_channels, 3, padding="same", name="conv")
        self.blocks = [ResidualBlock(hidden_channels, max(hidden_channels // 4, 1), name=f"res{i}")
                       for i in range(num_res_blocks)]
        self.up = [layers.Conv2DTranspose(hidden_channels // 2, 4, strides=2, padding="same", activation="relu",
                                          name=f"up{i}") for i in range(n - 1)]
        self.up.append(layers.Conv2DTranspose(1, 4, strides=2, padding="same", name=f"up{n - 1}"))

    def build(self, input_shape):
        _build_chain([self.conv, *self.blocks, *self.up], input_shape)

    def call(self, codes):
        x = self.conv(codes)
        for block in self.blocks:
            x = block(x)
        x = ops.relu(x)
        for conv in self.up:
            x = conv(x)  # (N, H/f * 2^(i+1), ..., C)
        return x  # (N, H, W, 1)

    def get_config(self):
        return {**super().get_config(), "downsample": self.downsample, "hidden_channels": self.hidden_channels,
                "num_res_blocks": self.num_res_blocks}


@keras.saving.register_keras_serializable(package=PACKAGE)
class VQVAE(keras.Model):
    """Encoder -> VectorQuantizer -> Decoder. `call` returns reconstructions (the quantizer adds its loss);
    `encode` gives the code grid and `decode` maps a code grid back to images, which is what the prior samples."""

    def __init__(self, downsample: int = 4, num_embeddings: int = 512, embedding_dim: int = 64,
                 hidden_channels: int = 128, num_res_blocks: int = 2, commitment_cost: float = 0.25, **kwargs):
        super().__init__(**kwargs)
        self.downsample = downsample
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.hidden_channels = hidden_channels
        self.num_res_blocks = num_res_blocks
        self.commitment_cost = commitment_cost
        self.encoder = Encoder(downsample, hidden_channels, num_res_blocks, embedding_dim, name="encoder")
        self.quantizer = VectorQuantizer(num_embeddings, embedding_dim, commitment_cost, name="quantizer")
        self.decoder = Decoder(downsample, hidden_channels, num_res_blocks, name="decoder")

    def build(self, input_shape):
        # Built explicitly so a reloaded model has its weights before the first call.
        self.encoder.build(input_shape)
        code_shape = (input_shape[0], None, None, self.embedding_dim)
        self.quantizer.build(code_shape)
        self.decoder.build(code_shape)

    def call(self, images):
        return self.decoder(self.quantizer(self.encoder(images)))

    def encode(self, images):
        """(N, H, W, 1) images -> (N, H/f, W/f) int32 code grid."""
        return self.quantizer.nearest_indices(self.encoder(images))

    def decode(self, indices):
        """(N, h, w) code grid -> (N, h*f, w*f, 1) images clipped to [0, 1]."""
        return ops.clip(self.decoder(self.quantizer.embed(indices)), 0.0, 1.0)

    def get_config(self):
        return {**super().get_config(), "downsample": self.downsample, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "hidden_channels": self.hidden_channels,
                "num_res_blocks": self.num_res_blocks, "commitment_cost": self.commitment_cost}
