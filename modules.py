"""The models: a VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning") and a gated PixelCNN
prior over its code grid (van den Oord et al. 2016), with the builders that make them from a run's config.

Backend-agnostic Keras 3: only `keras`, `keras.ops` and `keras.random` appear here, so the same file trains under
TensorFlow (the scripts) and JAX (GPU checks with KERAS_BACKEND=jax). Every class is registered serializable with
a complete get_config, so `keras.saving.load_model("vqvae.keras")` needs no custom_objects.

Mixed precision: pass dtype="mixed_bfloat16" (or "mixed_float16") to VQVAE or PixelCNNPrior. Each composite
layer hands its dtype policy to the layers it creates; the quantizer, the decoder's output layer and the prior's
logits stay float32, so code distances, the VQ losses, reconstructions and softmaxes are computed in full precision.

Shapes at the OASIS preset (256 px, downsample 4, D = 64, K = 512):
    images (N, 256, 256, 1) -> Encoder -> z_e (N, 64, 64, 64) -> VectorQuantizer -> z_q (N, 64, 64, 64)
    -> Decoder -> reconstructions (N, 256, 256, 1); the code grid is the (N, 64, 64) int32 indices of z_q.
"""

from __future__ import annotations

import math
import threading

import keras
from keras import layers, ops

PACKAGE = "brainvq"
# A two-level prior's layout grid has one cell per LAYOUT_POOL x LAYOUT_POOL codes: 16x16 cells of 8x8 px on the
# demo (128 px, 32x32 codes), 32x32 cells at OASIS scale: coarse enough for a short sequence, fine enough to place
# ventricles and the midline.
LAYOUT_POOL = 2


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class VectorQuantizer(layers.Layer):
    """Maps each D-vector of its input to the nearest of `num_embeddings` codebook vectors (squared Euclidean).

    Forward, the output is the nearest code e_k; backward, the gradient passes straight through to the input
    (z_e + stop_gradient(e_k - z_e)). It adds the paper's loss
        || stop_gradient(z_e) - e_k ||^2  +  commitment_cost * || z_e - stop_gradient(e_k) ||^2
    The codebook term is minimised by exponential moving averages, as the paper's appendix A.1 offers (and VQ-VAE-2
    does), not by gradient descent: in training, each code moves to the moving average of the encoder outputs that
    picked it (decay 0.99), so codes keep up with an encoder trained at a high learning rate, which Adam-trained
    codes did not (they fell behind and the codebook collapsed to a few codes). The commitment term trains the
    encoder. The codebook is ema_dw / ema_cluster_size, both kept as fractions of a batch's vectors, so that the
    updates of several replicas, averaged, equal the update of their whole batch.

    Example: inputs (8, 16, 16, 32) with num_embeddings=128, embedding_dim=32 give outputs (8, 16, 16, 32) and
    `nearest_codes(inputs)[1]`, the code indices, (8, 16, 16) int32 in [0, 128).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25, decay: float = 0.99,
                 epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        _check_positive(num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        if commitment_cost < 0:
            raise ValueError(f"commitment_cost must be >= 0, got {commitment_cost}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.decay, self.epsilon = decay, epsilon
        self._thread = threading.local()

    def build(self, input_shape):
        if input_shape[-1] != self.embedding_dim:
            raise ValueError(f"VectorQuantizer expects inputs with {self.embedding_dim} channels, got {input_shape}")
        k, d = self.num_embeddings, self.embedding_dim
        # The share of a batch's vectors each code takes (K,), and the sum of those vectors over the batch's size
        # (K, D). Codes start uniform in +-sqrt(3/K) (VarianceScaling over (K, D)), each with a 1/K share.
        self.ema_cluster_size = self.add_weight(name="ema_cluster_size", shape=(k,), trainable=False,
                                                initializer=keras.initializers.Constant(1.0 / k), aggregation="mean")
        self.ema_dw = self.add_weight(name="ema_dw", shape=(k, d), trainable=False, aggregation="mean",
                                      initializer=keras.initializers.VarianceScaling(scale=1.0 / k**2,
                                                                                     distribution="uniform"))

    def _smoothed(self, cluster_size):
        """(K,) shares, Laplace-smoothed so that a code no vector picked divides by epsilon, not by zero."""
        total = ops.sum(cluster_size)
        return (cluster_size + self.epsilon) / (total + self.num_embeddings * self.epsilon) * total

    def codebook(self):
        """(K, D) float32: row k is code e_k, the moving average of the vectors that picked it."""
        smoothed = self._smoothed(ops.convert_to_tensor(self.ema_cluster_size))
        return ops.convert_to_tensor(self.ema_dw) / smoothed[:, None]

    def set_codebook(self, codebook) -> None:
        """Makes `codebook` (K, D) the codes, each with an equal share of the vectors."""
        self.ema_cluster_size.assign(ops.full((self.num_embeddings,), 1.0 / self.num_embeddings))
        self.ema_dw.assign(ops.convert_to_tensor(codebook, "float32") / self.num_embeddings)

    def nearest_indices(self, inputs, codebook=None):
        """(..., D) -> (...) int32 index of the nearest code (of `codebook`, by default the current one)."""
        flat = ops.cast(ops.reshape(inputs, (-1, self.embedding_dim)), "float32")  # (M, D), bf16/fp16 in: upcast
        codebook = self.codebook() if codebook is None else codebook
        # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2, without materialising an (M, K, D) tensor.
        distances = (ops.sum(flat**2, axis=1, keepdims=True) - 2.0 * ops.matmul(flat, ops.transpose(codebook))
                     + ops.sum(codebook**2, axis=1)[None, :])  # (M, K)
        indices = ops.cast(ops.argmin(distances, axis=1), "int32")
        return ops.reshape(indices, ops.shape(inputs)[:-1])

    def embed(self, indices):
        """(...) int code indices -> (..., D) codebook vectors (float32)."""
        return one_hot_lookup(self.codebook(), indices)

    def nearest_codes(self, inputs):
        """(..., D) -> (nearest codes (..., D), indices (...)); no loss, no gradient trick."""
        # One read of the codebook: in training, under a MirroredStrategy, a second read could come after the
        # replicas' synchronised update and give the step's loss and output a different codebook.
        codebook = self.codebook()
        indices = self.nearest_indices(inputs, codebook)
        return ops.cast(one_hot_lookup(codebook, indices), inputs.dtype), indices

    def update_codebook(self, inputs, indices) -> None:
        """One moving-average step of the codebook towards the vectors `inputs` (..., D) that picked `indices`."""
        flat = ops.reshape(ops.stop_gradient(inputs), (-1, self.embedding_dim))  # (M, D)
        one_hot = ops.one_hot(ops.reshape(indices, (-1,)), self.num_embeddings, dtype="float32")  # (M, K)
        size = ops.cast(ops.shape(flat)[0], "float32")
        share = ops.sum(one_hot, axis=0) / size  # (K,)
        mean_sum = ops.matmul(ops.transpose(one_hot), flat) / size  # (K, D), a dense matmul: no scatter
        self.ema_cluster_size.assign(self.decay * self.ema_cluster_size + (1 - self.decay) * share)
        self.ema_dw.assign(self.decay * self.ema_dw + (1 - self.decay) * mean_sum)

    def restart_unused_codes(self, inputs, seed=None) -> int:
        """Moves every code that no vector of `inputs` (..., D) picks onto a randomly chosen input vector, so
        dead codes rejoin training (the standard remedy for codebook collapse). Returns how many moved."""
        flat = ops.reshape(ops.convert_to_tensor(inputs, "float32"), (-1, self.embedding_dim))
        used = ops.bincount(self.nearest_indices(flat), minlength=self.num_embeddings) > 0  # (K,)
        picks = keras.random.randint((self.num_embeddings,), 0, ops.shape(flat)[0], seed=seed)
        codebook = ops.where(used[:, None], self.codebook(), ops.take(flat, picks, axis=0))
        cluster_size = ops.where(used, ops.convert_to_tensor(self.ema_cluster_size), 1.0 / self.num_embeddings)
        self.ema_cluster_size.assign(cluster_size)
        self.ema_dw.assign(codebook * self._smoothed(cluster_size)[:, None])  # the used codes stay where they were
        return int(self.num_embeddings - ops.sum(ops.cast(used, "int32")))

    def call(self, inputs, training=False):
        inputs = ops.cast(inputs, "float32")  # losses and the straight-through sum in full precision
        quantized, indices = self.nearest_codes(inputs)  # read before the codebook's update below
        codebook_loss = ops.mean((ops.stop_gradient(inputs) - quantized) ** 2)  # no gradient: minimised by the EMA
        commitment_loss = ops.mean((inputs - ops.stop_gradient(quantized)) ** 2)
        loss = codebook_loss + self.commitment_cost * commitment_loss
        self.add_loss(loss)
        self._thread.loss = loss  # see VQVAE.losses
        if training and self.trainable:  # a frozen quantizer (the decoder's sharpening epochs) keeps its codes
            self.update_codebook(inputs, indices)
        return inputs + ops.stop_gradient(quantized - inputs)  # straight-through estimator

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "commitment_cost": self.commitment_cost, "decay": self.decay, "epsilon": self.epsilon}


def one_hot_lookup(table, indices):
    """table[indices] for a (K, D) table and int indices (...) -> (..., D), computed as one_hot(indices) @ table.

    The values are a gather's (each row times exactly 1, plus zeros), but the gradient is a dense matmul as well.
    A gather's gradient is a scatter-add of every index into the table, and XLA's GPU scatter with 100k+ indices
    colliding on a few hundred rows (a batch of code grids) made the compiled training step 165x slower.
    """
    one_hot = ops.one_hot(ops.cast(indices, "int32"), ops.shape(table)[0], dtype=table.dtype)  # (..., K)
    return ops.matmul(one_hot, table)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResidualBlock(layers.Layer):
    """x + conv1x1(relu(conv3x3(relu(x)))), the VQ-VAE paper's residual block."""

    def __init__(self, channels: int, hidden_channels: int, **kwargs):
        super().__init__(**kwargs)
        _check_positive(channels=channels, hidden_channels=hidden_channels)
        self.channels = channels
        self.hidden_channels = hidden_channels
        self.conv3 = layers.Conv2D(hidden_channels, 3, padding="same", name="conv3x3", dtype=self.dtype_policy)
        self.conv1 = layers.Conv2D(channels, 1, name="conv1x1", dtype=self.dtype_policy)

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

    def __init__(self, downsample: int, hidden_channels: int, num_res_blocks: int, embedding_dim: int, **kwargs):
        super().__init__(**kwargs)
        _check_positive(hidden_channels=hidden_channels, embedding_dim=embedding_dim)
        self.downsample = downsample
        self.hidden_channels = hidden_channels
        self.num_res_blocks = num_res_blocks
        self.embedding_dim = embedding_dim
        n = _num_halvings(downsample)
        policy = self.dtype_policy  # sublayers compute in this layer's precision
        self.down = [layers.Conv2D(hidden_channels // 2 if i < n - 1 else hidden_channels, 4, strides=2,
                                   padding="same", activation="relu", name=f"down{i}", dtype=policy)
                     for i in range(n)]
        self.conv = layers.Conv2D(hidden_channels, 3, padding="same", name="conv", dtype=policy)
        self.blocks = [ResidualBlock(hidden_channels, max(hidden_channels // 4, 1), name=f"res{i}", dtype=policy)
                       for i in range(num_res_blocks)]
        self.project = layers.Conv2D(embedding_dim, 1, name="to_embedding", dtype=policy)

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

    def __init__(self, downsample: int, hidden_channels: int, num_res_blocks: int, **kwargs):
        super().__init__(**kwargs)
        _check_positive(hidden_channels=hidden_channels)
        self.downsample = downsample
        self.hidden_channels = hidden_channels
        self.num_res_blocks = num_res_blocks
        n = _num_halvings(downsample)
        policy = self.dtype_policy
        self.conv = layers.Conv2D(hidden_channels, 3, padding="same", name="conv", dtype=policy)
        self.blocks = [ResidualBlock(hidden_channels, max(hidden_channels // 4, 1), name=f"res{i}", dtype=policy)
                       for i in range(num_res_blocks)]
        self.up = [layers.Conv2DTranspose(hidden_channels // 2, 4, strides=2, padding="same", activation="relu",
                                          name=f"up{i}", dtype=policy) for i in range(n - 1)]
        # the output layer in float32: intensities and the MSE keep full precision under mixed precision
        self.up.append(layers.Conv2DTranspose(1, 4, strides=2, padding="same", name=f"up{n - 1}", dtype="float32"))

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
    `encode` gives the code grid and `decode` maps a code grid back to images, which is what the prior samples.

    `background`: decoded intensities below it are set to exactly 0. Skull-stripped slices are exactly 0 outside
    the head, and a linear output only gets near 0: a faint +-0.003 haze over the background, which no eye sees
    and a CNN spots at once (it told such reconstructions from real slices 69% of the time, and 44%, as often as
    real from real, once the haze was gone). Training (`call`) is unaffected; 0 turns it off.
    """

    def __init__(self, downsample: int, num_embeddings: int, embedding_dim: int, hidden_channels: int,
                 num_res_blocks: int, commitment_cost: float = 0.25, background: float = 0.0,
                 codes_frozen: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= background < 1:
            raise ValueError(f"background must be in [0, 1), got {background}")
        self.background = background
        self.downsample = downsample
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.hidden_channels = hidden_channels
        self.num_res_blocks = num_res_blocks
        self.commitment_cost = commitment_cost
        policy = self.dtype_policy
        self.encoder = Encoder(downsample, hidden_channels, num_res_blocks, embedding_dim, name="encoder",
                               dtype=policy)
        # always float32: nearest-code distances and the VQ losses lose code assignments in bf16/fp16
        self.quantizer = VectorQuantizer(num_embeddings, embedding_dim, commitment_cost, name="quantizer",
                                         dtype="float32")
        self.decoder = Decoder(downsample, hidden_channels, num_res_blocks, name="decoder", dtype=policy)
        self.codes_frozen = False
        if codes_frozen:
            self.freeze_codes()

    def freeze_codes(self) -> None:
        """From now on only the decoder learns: the encoder and the codebook, hence the code of every image, stay
        as they are (saved with the model, so a reloaded one trains the same weights with its optimizer state)."""
        self.codes_frozen = True
        self.encoder.trainable = False
        self.quantizer.trainable = False

    def build(self, input_shape):
        # Built explicitly so a reloaded model has its weights before the first call.
        self.encoder.build(input_shape)
        code_shape = (input_shape[0], None, None, self.embedding_dim)
        self.quantizer.build(code_shape)
        self.decoder.build(code_shape)

    def call(self, images, training=False):
        # `training` is passed on explicitly: in training the quantizer also moves its codes (moving averages)
        return self.decoder(self.quantizer(self.encoder(images), training=training))

    @property
    def losses(self):
        # Under TensorFlow's MirroredStrategy each replica runs `call` in a thread of its own, and the threads take
        # turns at the codebook's synchronised update. Keras keeps add_loss results in one list per layer, which
        # each replica's call empties when it starts, so a replica would read another's VQ loss (and lose the
        # commitment gradient of its own half batch). The VQ loss is the model's only added loss: each thread
        # reads the one its own last call made. (JAX training collects losses statelessly and is unaffected.)
        own = getattr(self.quantizer._thread, "loss", None)
        return [own] if own is not None and keras.backend.backend() == "tensorflow" else super().losses

    def encode(self, images):
        """(N, H, W, 1) images -> (N, H/f, W/f) int32 code grid."""
        return self.quantizer.nearest_indices(self.encoder(images))

    def decode(self, indices):
        """(N, h, w) code grid -> (N, h*f, w*f, 1) images clipped to [0, 1], background (below `background`) 0."""
        images = ops.clip(self.decoder(self.quantizer.embed(indices)), 0.0, 1.0)
        return ops.where(images < self.background, ops.zeros_like(images), images)

    def layout(self, indices, levels: int):
        """(N, h, w) code grid -> (N, h/2, w/2) layout grid of its decoded slice (`layout_grid`): a function of the
        codes alone, so a two-level prior's p(layout) p(codes | layout) is p(codes)."""
        return layout_grid(self.decode(indices), self.downsample, levels)

    def get_config(self):
        return {**super().get_config(), "downsample": self.downsample, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "hidden_channels": self.hidden_channels,
                "num_res_blocks": self.num_res_blocks, "commitment_cost": self.commitment_cost,
                "background": self.background, "codes_frozen": self.codes_frozen}


# ---------------------------------------------------------------------------------------------------------------
# The prior: a gated PixelCNN over the code grid (van den Oord et al. 2016, "Conditional Image Generation with
# PixelCNN Decoders"). It predicts p(x_ij | codes before (i, j) in raster order) as K logits per position.
# ---------------------------------------------------------------------------------------------------------------


def pixelcnn_mask(kernel_size: tuple[int, int], mask_type: str):
    """The (kh, kw) 0/1 mask of a causal convolution. With centre (ch, cw):
    A: rows above the centre, and the centre row left of the centre (the first layer: x_ij must not see x_ij);
    B: as A plus the centre itself (later layers);
    V: rows above and the whole centre row (the vertical stack, whose output is shifted down one row)."""
    import numpy as np

    kh, kw = kernel_size
    ch, cw = kh // 2, kw // 2
    mask = np.zeros((kh, kw), "float32")
    mask[:ch] = 1.0
    if mask_type == "V":
        mask[ch] = 1.0
    elif mask_type in ("A", "B"):
        mask[ch, :cw + (mask_type == "B")] = 1.0
    else:
        raise ValueError(f"mask_type must be 'A', 'B' or 'V', got {mask_type!r}")
    return mask


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskedConv2D(layers.Layer):
    """A 'same'-padded 2-D convolution whose kernel is multiplied by a causal mask (see pixelcnn_mask) in call,
    so the masked weights stay zero in effect whatever the optimizer does to them."""

    def __init__(self, filters: int, kernel_size, mask_type: str = "B", **kwargs):
        super().__init__(**kwargs)
        kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        _check_positive(filters=filters, kernel_height=kernel_size[0], kernel_width=kernel_size[1])
        if kernel_size[0] % 2 == 0 or kernel_size[1] % 2 == 0:
            raise ValueError(f"kernel_size must be odd so the kernel has a centre, got {kernel_size}")
        self.filters = filters
        self.kernel_size = kernel_size
        self.mask_type = mask_type
        self.mask = pixelcnn_mask(kernel_size, mask_type)[:, :, None, None]  # (kh, kw, 1, 1)
        rows, cols = (self.mask[..., 0, 0].any(axis=a).nonzero()[0] for a in (1, 0))
        if not len(rows):
            raise ValueError(f"a {kernel_size} kernel with mask {mask_type!r} sees nothing")
        self.kept = (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))  # the mask's bounding box

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(*self.kernel_size, input_shape[-1], self.filters),
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def masked_kernel(self):
        dtype = self.compute_dtype  # the kernel is float32; under mixed precision it computes in bf16/fp16
        return ops.cast(self.kernel, dtype) * ops.convert_to_tensor(self.mask, dtype)

    def call(self, inputs):
        # Only the kernel rows and columns the mask keeps are convolved (3 of 5 rows for a 5x5 "V" mask), on an input
        # padded so that the result is the 'same' convolution with the whole masked kernel: fewer multiplications.
        (top, bottom), (left, right) = self.kept
        ch, cw = self.kernel_size[0] // 2, self.kernel_size[1] // 2
        kernel = self.masked_kernel()[top:bottom + 1, left:right + 1]
        padded = ops.pad(inputs, ((0, 0), (ch - top, max(bottom - ch, 0)), (cw - left, max(right - cw, 0)), (0, 0)))
        outputs = ops.conv(padded, kernel, padding="valid")  # (N, H, W + overhang, filters)
        if right < cw:  # the kept part ends left of the centre (a one-row "A" mask): drop the overhanging columns
            outputs = outputs[:, :, : right - cw]
        return outputs + self.bias

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "mask_type": self.mask_type}


def _gate(x):
    """Gated activation unit: tanh(first half of channels) * sigmoid(second half)."""
    a, b = ops.split(x, 2, axis=-1)
    return ops.tanh(a) * ops.sigmoid(b)


def _shift_down(x):
    """(N, H, W, C) -> the same with every row moved one down and zeros in row 0."""
    return ops.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatedPixelCNNBlock(layers.Layer):
    """One layer of the gated PixelCNN: a vertical stack (rows above, no blind spot) and a horizontal stack
    (the current row, left of the position), each through the gated unit; the vertical stack feeds the horizontal
    one through a 1x1 convolution, shifted down one row so that row i only sees rows above it.

    Besides the codes, each gate receives the position map (location-dependent conditioning, section 2.3 of the
    paper: brains sit at the centre of the frame, which a convolution cannot know on its own) and, when
    num_conditions > 0, a conditioning vector y: tanh(W_f * x + V_f * position + U_f y) * sigmoid(... g ...).

    Inputs and outputs: (v, h) each (N, H, W, C); call also returns the skip output (N, H, W, C). The last
    block (last=True) only feeds the skip sum, so it has no outputs for a next block and returns v = h = None.
    """

    def __init__(self, channels: int, kernel_size: int = 3, first: bool = False, last: bool = False,
                 num_conditions: int = 0, **kwargs):
        super().__init__(**kwargs)
        _check_positive(channels=channels, kernel_size=kernel_size)
        self.channels, self.kernel_size, self.num_conditions = channels, kernel_size, num_conditions
        self.first, self.last = first, last
        policy = self.dtype_policy
        self.vertical = MaskedConv2D(2 * channels, (kernel_size, kernel_size), "V", name="vertical", dtype=policy)
        self.horizontal = MaskedConv2D(2 * channels, (1, kernel_size), "A" if first else "B", name="horizontal",
                                       dtype=policy)
        self.link = layers.Conv2D(2 * channels, 1, name="vertical_to_horizontal", dtype=policy)
        self.skip = layers.Conv2D(channels, 1, name="skip", dtype=policy)
        self.residual = None if last else layers.Conv2D(channels, 1, name="residual", dtype=policy)
        self.position_h = layers.Dense(2 * channels, use_bias=False, name="position_horizontal", dtype=policy)
        self.position_v = (None if last else
                           layers.Dense(2 * channels, use_bias=False, name="position_vertical", dtype=policy))
        if num_conditions:
            self.condition_h = layers.Dense(2 * channels, use_bias=False, name="condition_horizontal", dtype=policy)
            if not last:
                self.condition_v = layers.Dense(2 * channels, use_bias=False, name="condition_vertical",
                                                dtype=policy)

    def build(self, input_shape):  # input_shape: that of v, (N, H, W, C)
        shape = tuple(input_shape)
        _build_chain([self.vertical, self.link], shape)
        for layer in [self.horizontal, self.position_h, self.skip]:
            layer.build(shape)
        if not self.last:
            self.residual.build(shape)
            self.position_v.build(shape)
        if self.num_conditions:
            self.condition_h.build((None, self.num_conditions))
            if not self.last:
                self.condition_v.build((None, self.num_conditions))

    def gate_terms(self, position, condition, rank: int, stack: str):
        """What the position map (..., C) and the condition (N, num_conditions) add to the gate of one stack
        ("vertical" or "horizontal"), broadcastable against features of `rank` dims (4 for maps, 2 for one
        position)."""
        vertical = stack == "vertical"
        terms = (self.position_v if vertical else self.position_h)(position)
        if self.num_conditions:
            expand = (slice(None), *([None] * (rank - 2)), slice(None))  # (N, 2C) -> (N, 1, 1, 2C) for maps
            terms = terms + (self.condition_v if vertical else self.condition_h)(condition)[expand]
        return terms

    def call(self, v, h, position, condition=None):
        v_features = self.vertical(v)  # (N, H, W, 2C): rows <= i
        h_features = self.horizontal(h) + _shift_down(self.link(v_features))  # rows < i, and row i left of j
        gated = _gate(h_features + self.gate_terms(position, condition, 4, "horizontal"))
        if self.last:
            return None, None, self.skip(gated)
        # the first block adds no residual: its input h holds the current code, which it must not see
        h_out = self.residual(gated) if self.first else h + self.residual(gated)
        v_out = _gate(v_features + self.gate_terms(position, condition, 4, "vertical"))
        return v_out, h_out, self.skip(gated)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "kernel_size": self.kernel_size,
                "first": self.first, "last": self.last, "num_conditions": self.num_conditions}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelCNNPrior(keras.Model):
    """Gated PixelCNN over a code grid: (N, H, W) int codes -> (N, H, W, K) logits of each code given the codes
    before it in raster order. With num_conditions > 0 it takes (codes, condition (N, num_conditions)).

    `sample` generates code grids with cached activations (Ramachandran et al. 2017, "Fast Generation for
    Convolutional Autoregressive Models"): per row, one row of the vertical stack is computed from cached rows;
    per position, the horizontal stack is computed at that position only, from cached left neighbours. The whole
    loop is ops.fori_loop, so it compiles into one graph (tf.function / jax.jit).

    With attention_layers > 0, causal self-attention over the whole grid follows the gated stack (as in
    PixelSNAIL, Chen et al. 2018): the convolutions see a window of rows above a position, attention every position
    before it, so the layout of the whole slice (symmetry, where the ventricles are) can inform each code.

    With layout_levels > 0 it is a two-level prior (after VQ-VAE-2, Razavi et al. 2019, and multiscale PixelCNNs,
    Reed et al. 2017): a coarse layout grid of half the size on each side (the decoded slice's mean intensity per
    cell in layout_levels bins, `layout_grid`) is modelled first, by a PixelCNNPrior of its own (`layout_prior`,
    the same depth, width and conditions), and every gate of the code prior sees the layout around its position
    (`layout_features`): the cells below and right of a code too, where no code before it reaches. The layout is
    a function of the codes, so p(codes) = p(layout) p(codes | layout): the two cross-entropies, the layout's
    weighted by its share of cells, add up to the codes' NLL. Inputs are then [codes, condition, layout]
    ([codes, layout] unconditioned), and call returns {"codes": logits, "layout": layout logits (N, H/2, W/2,
    layout_levels)}; `sample` draws the layout first.

    With condition_dropout p > 0, training drops the condition of a share p of the grids (a zero vector, which no
    depth's sin/cos features equal), so the one model is also an unconditional prior: sampling can then use
    classifier-free guidance (Ho & Salimans 2022), logits_u + s (logits_c - logits_u) (`guided_draw`).

    Example (the demo preset's code prior, one level): PixelCNNPrior(num_embeddings=256, grid_shape=(32, 32),
    channels=32, num_layers=6, kernel_size=3) maps codes (8, 32, 32) to logits (8, 32, 32, 256); its position map
    is a learned (32, 32, 32) weight.
    """

    def __init__(self, num_embeddings: int, grid_shape, channels: int, num_layers: int, kernel_size: int,
                 num_conditions: int = 0, attention_layers: int = 0, layout_levels: int = 0,
                 condition_dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        _check_positive(num_embeddings=num_embeddings, channels=channels, num_layers=num_layers,
                        grid_height=grid_shape[0], grid_width=grid_shape[1])
        if kernel_size % 2 == 0 or kernel_size < 3:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        self.num_embeddings, self.grid_shape = num_embeddings, tuple(grid_shape)
        self.channels, self.num_layers = channels, num_layers
        self.kernel_size, self.num_conditions = kernel_size, num_conditions
        if attention_layers < 0:
            raise ValueError(f"attention_layers must be 0 or more, got {attention_layers}")
        self.attention_layers = attention_layers
        if layout_levels < 0 or layout_levels == 1:
            raise ValueError(f"layout_levels must be 0 (one level) or 2 or more, got {layout_levels}")
        if layout_levels and (grid_shape[0] % LAYOUT_POOL or grid_shape[1] % LAYOUT_POOL):
            raise ValueError(f"a two-level prior needs a grid divisible by {LAYOUT_POOL}, got {tuple(grid_shape)}")
        self.layout_levels = layout_levels
        if not 0 <= condition_dropout < 1 or (condition_dropout and not num_conditions):
            raise ValueError(f"condition_dropout must be in [0, 1), and 0 without conditions, got {condition_dropout}")
        self.condition_dropout = condition_dropout
        self.dropout_seed = keras.random.SeedGenerator(0) if condition_dropout else None
        policy = self.dtype_policy
        self.embedding = layers.Embedding(num_embeddings, channels, name="code_embedding", dtype=policy)
        self.blocks = [GatedPixelCNNBlock(channels, kernel_size, first=i == 0, last=i == num_layers - 1,
                                          num_conditions=num_conditions, name=f"gated{i}", dtype=policy)
                       for i in range(num_layers)]
        # Each attention layer: one head; queries, keys and values from one projection; the output projection
        # starts at zero, so a new layer starts as the identity and the stack's training is undisturbed at first.
        self.attention_qkv = [layers.Dense(3 * channels, name=f"attention{a}_qkv", dtype=policy)
                              for a in range(attention_layers)]
        self.attention_out = [layers.Dense(channels, kernel_initializer="zeros", name=f"attention{a}_out",
                                           dtype=policy) for a in range(attention_layers)]
        self.head_hidden = layers.Conv2D(channels, 1, name="head_hidden", dtype=policy)
        self.head_logits = layers.Conv2D(num_embeddings, 1, name="logits", dtype="float32")  # softmax in float32
        if layout_levels:
            self.layout_prior = PixelCNNPrior(layout_levels, self.layout_shape, channels, num_layers, kernel_size,
                                              num_conditions, name="layout_prior", dtype=policy)
            self.layout_embedding = layers.Embedding(layout_levels, channels, name="layout_embedding", dtype=policy)
            # two 3x3 convolutions, over cells then over codes: each code sees the layout 2 cells around it
            self.layout_convs = [layers.Conv2D(channels, 3, padding="same", activation="relu", name=name,
                                               dtype=policy) for name in ("layout_cells", "layout_features")]

    @property
    def layout_shape(self) -> tuple[int, int]:
        return self.grid_shape[0] // LAYOUT_POOL, self.grid_shape[1] // LAYOUT_POOL

    def build(self, input_shape):  # (N, H, W); a list [(N, H, W), (N, num_conditions), (N, H/2, W/2)] of those used
        shape = tuple(input_shape[0] if self.num_conditions or self.layout_levels else input_shape)
        self.embedding.build(shape)
        self.position = self.add_weight(name="position_map", shape=(*self.grid_shape, self.channels),
                                        initializer=keras.initializers.RandomNormal(stddev=1.0))
        features = (*shape, self.channels)
        if self.layout_levels:
            layout = (shape[0], *self.layout_shape)
            self.layout_prior.build(self.layout_prior.pack_inputs(layout, (shape[0], self.num_conditions)))
            self.layout_embedding.build(layout)
            self.layout_convs[0].build((*layout, self.channels))
            self.layout_convs[1].build(features)
        for block in self.blocks:
            block.build(features)
        for qkv, out in zip(self.attention_qkv, self.attention_out):
            qkv.build(features)
            out.build(features)
        self.head_hidden.build(features)
        self.head_logits.build(features)

    def embed(self, codes):
        """(...) int codes -> (..., C) code embeddings, by a one-hot matmul (its gradient has no scatter)."""
        return one_hot_lookup(ops.cast(self.embedding.embeddings, self.compute_dtype), codes)

    def pack_inputs(self, codes, condition=None, layout=None):
        """What call (and build, with shapes) takes: the codes alone, or a list [codes, condition, layout] of those
        this prior uses. The inverse of _split_inputs."""
        inputs = [codes] + [condition] * bool(self.num_conditions) + [layout] * bool(self.layout_levels)
        return inputs if len(inputs) > 1 else codes

    def pack_targets(self, codes, layout=None):
        """What fit and the loss take as targets for those inputs: the codes, or {"codes", "layout"} with two levels
        (the keys of call's outputs)."""
        return {"codes": codes, "layout": layout} if self.layout_levels else codes

    def _split_inputs(self, inputs):
        """-> codes, condition (or None), layout (or None)."""
        if not (self.num_conditions or self.layout_levels):
            return inputs, None, None
        codes, *rest = inputs
        condition = ops.convert_to_tensor(rest.pop(0), "float32") if self.num_conditions else None
        return codes, condition, (rest.pop(0) if self.layout_levels else None)

    def layout_features(self, layout):
        """(N, H/2, W/2) layout grid -> (N, H, W, C) features that every gate of the code prior sees: the cells'
        embeddings through a 3x3 convolution, spread over their 2x2 codes, through another (the layout is given
        whole, so no masks)."""
        cells = self.layout_convs[0](one_hot_lookup(ops.cast(self.layout_embedding.embeddings, self.compute_dtype),
                                                    layout))  # (N, H/2, W/2, C)
        for axis in (1, 2):
            cells = ops.repeat(cells, LAYOUT_POOL, axis=axis)
        return self.layout_convs[1](cells)  # (N, H, W, C)

    def call(self, inputs, training=False):
        codes, condition, layout = self._split_inputs(inputs)
        if training and self.condition_dropout:  # one draw per grid, for its codes and its layout alike
            kept = keras.random.uniform((ops.shape(condition)[0], 1), seed=self.dropout_seed) >= self.condition_dropout
            condition = condition * ops.cast(kept, condition.dtype)
        if tuple(codes.shape[1:]) != self.grid_shape:
            raise ValueError(f"this prior models {self.grid_shape} code grids, got {tuple(codes.shape[1:])}")
        v = h = self.embed(codes)  # (N, H, W, C)
        spatial = self.position[None]  # (1, H, W, C): where in the frame; plus, with two levels, the layout there
        if self.layout_levels:
            spatial = spatial + self.layout_features(layout)  # (N, H, W, C)
        skips = 0.0
        for block in self.blocks:
            v, h, skip = block(v, h, spatial, condition)
            skips = skips + skip
        features = ops.relu(skips)  # (N, H, W, C): at each position, a function of the codes before it
        if self.attention_layers:
            n, (height, width) = ops.shape(features)[0], self.grid_shape
            features = ops.reshape(features, (n, height * width, self.channels))  # raster order
            order = ops.arange(height * width)
            causal = order[None, :] <= order[:, None]  # query i sees keys 0..i: functions of the codes before i
            for qkv, out in zip(self.attention_qkv, self.attention_out):
                query, key, value = ops.split(qkv(features), 3, axis=-1)  # (N, HW, C) each
                scores = ops.einsum("nqc,nkc->nqk", query, key) / math.sqrt(self.channels)  # (N, HW, HW)
                weights = ops.softmax(ops.where(causal, ops.cast(scores, "float32"), -1e9), axis=-1)
                features = features + out(ops.einsum("nqk,nkc->nqc", ops.cast(weights, value.dtype), value))
            features = ops.reshape(features, (n, height, width, self.channels))
        logits = self.head_logits(ops.relu(self.head_hidden(features)))  # (N, H, W, K)
        if not self.layout_levels:
            return logits
        layout_logits = self.layout_prior(self.layout_prior.pack_inputs(layout, condition))
        return {"codes": logits, "layout": layout_logits}

    def receptive_rows(self) -> int:
        """How many rows above a position can influence its logits."""
        return self.num_layers * (self.kernel_size // 2) + 1

    def sample(self, num_samples: int, draw, condition=None, layout=None):
        """Generates (num_samples, H, W) code grids.

        draw(logits (N, K), position (int scalar tensor, i * W + j)) -> (N,) int codes: the caller's sampling
        rule (a categorical draw with temperature and seed, or argmax). Everything else is keras.ops. A two-level
        prior first samples the layout (its positions numbered H * W onwards, so that they draw other numbers),
        unless one is given: (num_samples, H/2, W/2) int layout grids, the codes are then drawn given it.
        """
        if self.compute_dtype != "float32":
            raise ValueError("sample() runs in float32; sample a float32 copy of a mixed-precision prior "
                             "(modules.full_precision(prior), or Run.stage('prior').load_model(float32=True))")
        n, (height, width) = num_samples, self.grid_shape
        c = self.kernel_size // 2
        if self.num_conditions:
            condition = ops.convert_to_tensor(condition, "float32")
        # Caches, zero where the full forward pass zero-pads: vertical[l] is the input of block l's vertical
        # convolution, rows padded by c on top and columns by c on both sides.
        vertical = tuple(ops.zeros((n, height + c, width + 2 * c, self.channels)) for _ in self.blocks)
        # memory[a]: keys and values of attention layer a at every position sampled so far, (N, H * W, C) each
        memory = tuple((ops.zeros((n, height * width, self.channels)),) * 2 for _ in self.attention_qkv)
        codes = ops.zeros((n, height, width), "int32")
        position_map = ops.convert_to_tensor(self.position)[None]  # a tensor, not a variable: JAX slices only arrays
        if self.layout_levels:
            if layout is None:
                layout = self.layout_prior.sample(n, lambda logits, p: draw(logits, p + height * width), condition)
            position_map = position_map + self.layout_features(layout)  # (N, H, W, C)

        def row_step(i, state):
            codes, vertical, memory = state
            # The row above is final: push it through the vertical stack, one row per block.
            above = ops.maximum(i - 1, 0)
            v_row = self.embed(ops.slice(codes, (0, above, 0), (n, 1, width)))  # (N, 1, W, C)
            position_row = ops.slice(position_map, (0, above, 0, 0),
                                     (position_map.shape[0], 1, width, self.channels))  # (1 or N, 1, W, C)
            vertical = list(vertical)
            links = []
            for l, block in enumerate(self.blocks):
                vertical[l] = ops.slice_update(vertical[l], (0, above + c, c, 0), v_row)
                window = ops.slice(vertical[l], (0, above, 0, 0), (n, c + 1, width + 2 * c, self.channels))
                kernel = block.vertical.masked_kernel()[: c + 1]  # rows above + centre row: (c+1, k, C, 2C)
                v_features = ops.conv(window, kernel, padding="valid") + block.vertical.bias  # (N, 1, W, 2C)
                link = block.link(v_features)[:, 0]  # (N, W, 2C)
                links.append(ops.where(i > 0, link, ops.zeros_like(link)))  # row 0 has nothing above
                if not block.last:
                    v_row = _gate(v_features + block.gate_terms(position_row, condition, 4, "vertical"))
            codes, memory = self._sample_row(i, codes, links, memory, draw, condition, position_map)
            return codes, tuple(vertical), memory

        codes, _, _ = ops.fori_loop(0, height, row_step, (codes, vertical, memory))
        return codes

    def _sample_row(self, i, codes, links, memory, draw, condition, position_map):
        """Samples row i left to right; links[l] (N, W, 2C) carries the rows above into block l, memory the
        attention layers' keys and values of the positions before."""
        n, width = ops.shape(codes)[0], self.grid_shape[1]
        c = self.kernel_size // 2
        # horizontal[l]: the input of block l's horizontal convolution along row i, padded by c on the left.
        horizontal = tuple(ops.zeros((n, width + c, self.channels)) for _ in self.blocks)

        def column_step(j, state):
            codes, horizontal, memory = state
            horizontal, memory = list(horizontal), list(memory)
            rows = position_map.shape[0]
            position = ops.reshape(ops.slice(position_map, (0, i, j, 0), (rows, 1, 1, self.channels)),
                                   (rows, -1))  # (1 or N, C)
            skips = 0.0
            for l, block in enumerate(self.blocks):
                window = ops.slice(horizontal[l], (0, j, 0), (n, c + 1, self.channels))  # columns j-c .. j
                kernel = block.horizontal.masked_kernel()[0, : c + 1]  # (c+1, C, 2C): right of j is masked
                h_features = (ops.einsum("nkc,kcd->nd", window, kernel) + block.horizontal.bias
                              + ops.squeeze(ops.slice(links[l], (0, j, 0), (n, 1, 2 * self.channels)), 1))
                gated = _gate(h_features + block.gate_terms(position, condition, 2, "horizontal"))  # (N, C)
                skips = skips + _dense(block.skip, gated)
                if not block.last:
                    residual = _dense(block.residual, gated)
                    h = residual if block.first else window[:, c] + residual
                    horizontal[l + 1] = ops.slice_update(horizontal[l + 1], (0, j + c, 0), h[:, None])
            features = ops.relu(skips)  # (N, C)
            index = i * width + j  # in raster order
            seen = ops.arange(self.grid_shape[0] * width) <= index  # this position and the ones before
            for a, (qkv, out) in enumerate(zip(self.attention_qkv, self.attention_out)):
                query, key, value = ops.split(qkv(features), 3, axis=-1)  # (N, C) each
                keys, values = (ops.slice_update(cache, (0, index, 0), new[:, None])
                                for cache, new in zip(memory[a], (key, value)))
                memory[a] = keys, values
                scores = ops.einsum("nc,npc->np", query, keys) / math.sqrt(self.channels)  # (N, H * W)
                weights = ops.softmax(ops.where(seen[None], scores, -1e9), axis=-1)
                features = features + out(ops.einsum("np,npc->nc", weights, values))
            logits = _dense(self.head_logits, ops.relu(_dense(self.head_hidden, features)))  # (N, K)
            new = ops.cast(draw(logits, index), "int32")  # (N,)
            codes = ops.slice_update(codes, (0, i, j), new[:, None, None])
            horizontal[0] = ops.slice_update(horizontal[0], (0, j + c, 0), self.embed(new)[:, None])
            return codes, tuple(horizontal), tuple(memory)

        codes, _, memory = ops.fori_loop(0, width, column_step, (codes, horizontal, memory))
        return codes, memory

    def get_config(self):
        return {**super().get_config(), "num_embeddings": self.num_embeddings, "grid_shape": self.grid_shape,
                "channels": self.channels, "num_layers": self.num_layers, "kernel_size": self.kernel_size,
                "num_conditions": self.num_conditions, "attention_layers": self.attention_layers,
                "layout_levels": self.layout_levels, "condition_dropout": self.condition_dropout}


def guided_draw(draw, scale: float):
    """Classifier-free guidance for PixelCNNPrior.sample: a draw rule for a batch of 2N grids, the first N sampled
    with their conditions and the last N with zero conditions (a prior trained with condition_dropout), that draws
    from logits_u + scale * (logits_c - logits_u) and gives both halves the same codes, so that the second half
    stays the first half's unconditional twin. scale 1 is the conditioned prior itself; above 1, the condition counts
    for more. Sample 2N grids and keep the first N."""
    def guided(logits, position):
        conditioned, unconditioned = ops.split(logits, 2, axis=0)
        drawn = draw(unconditioned + scale * (conditioned - unconditioned), position)
        return ops.concatenate([drawn, drawn], axis=0)

    return guided


def top_k_draw(draw, k: int):
    """A draw rule for PixelCNNPrior.sample that only draws among the k most likely codes at each position (top-k
    sampling, Fan et al. 2018): the logits of the others become -1e9 before `draw` sees them, so the rare codes a
    full draw picks now and then are never drawn; k >= K changes nothing."""
    def truncated(logits, position):
        kth = ops.top_k(logits, min(k, logits.shape[-1]))[0][:, -1:]  # (N, 1): the k-th largest logit
        return draw(ops.where(logits < kth, ops.cast(-1e9, logits.dtype), logits), position)

    return truncated


def _dense(conv1x1, x):
    """A built 1x1 Conv2D applied to (N, C) vectors: the same weights as on a feature map."""
    return ops.matmul(x, conv1x1.kernel[0, 0]) + conv1x1.bias


def layout_grid(images, downsample: int, levels: int):
    """(N, S, S, 1) images in [0, 1] -> (N, S / (downsample * LAYOUT_POOL), ...) int32 layout grid: each cell's mean
    intensity in `levels` equal bins (0 = black background). A two-level prior models it before the codes."""
    cell = downsample * LAYOUT_POOL
    means = ops.average_pool(ops.convert_to_tensor(images, "float32"), cell, strides=cell)[..., 0]
    return ops.cast(ops.clip(ops.floor(means * levels), 0, levels - 1), "int32")


def slice_position_features(positions, frequencies: int):
    """(N,) slice depths in [0, 1] -> (N, 2F) conditioning vectors [sin(pi k p), cos(pi k p)] for k = 1..F: smooth
    in depth, and rich enough for the prior's gates to learn any function of depth that varies over 1/F of it."""
    k = ops.arange(1, frequencies + 1, dtype="float32")
    angles = math.pi * ops.cast(ops.reshape(positions, (-1, 1)), "float32") * k[None, :]  # (N, F)
    return ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# The tissue segmenter: what the tissue report (realism.py) reads generated slices with
# ---------------------------------------------------------------------------------------------------------------

TISSUES = ("background", "csf", "gray", "white")  # the classes of the OASIS segmentations (0/85/170/255)


@keras.saving.register_keras_serializable(package=PACKAGE)
class TissueSegmenter(keras.Model):
    """A small U-Net (Ronneberger et al. 2015) that labels each pixel of a slice as background, CSF, gray or white
    matter. Each level: two 3x3 convolutions; down by max-pooling, up by nearest upsampling and a concatenation with
    the level's encoder features, so the labels keep the image's resolution (the cortical ribbon is 2-3 px wide).

        images (N, S, S, 1) -> logits (N, S, S, 4)    (S divisible by 2 ** (len(channels) - 1))
    """

    def __init__(self, channels=(8, 16, 32), **kwargs):
        super().__init__(**kwargs)
        _check_positive(levels=len(channels), **{f"channels[{i}]": c for i, c in enumerate(channels)})
        self.channels = tuple(int(c) for c in channels)
        conv = dict(kernel_size=3, padding="same", activation="relu", dtype=self.dtype_policy)
        self.down = [[layers.Conv2D(c, **conv), layers.Conv2D(c, **conv)] for c in self.channels]
        self.up = [[layers.Conv2D(c, **conv), layers.Conv2D(c, **conv)] for c in self.channels[-2::-1]]
        self.logits = layers.Conv2D(len(TISSUES), 1, dtype="float32")

    def build(self, input_shape):
        n, size = input_shape[0], input_shape[1]
        shape, skips = tuple(input_shape), []
        for level, pair in enumerate(self.down):
            _build_chain(pair, shape)
            shape = (n, size >> level, size >> level, self.channels[level])
            skips.append(shape)
            shape = (n, size >> (level + 1), size >> (level + 1), self.channels[level])
        shape = skips.pop()
        for pair, skip in zip(self.up, reversed(skips)):
            _build_chain(pair, (*skip[:3], skip[3] + shape[3]))
            shape = (*skip[:3], pair[-1].filters)
        self.logits.build(shape)

    def call(self, images):
        x, skips = images, []
        for level, (first, second) in enumerate(self.down):
            x = second(first(x))
            if level < len(self.down) - 1:
                skips.append(x)
                x = ops.max_pool(x, 2, 2)
        for (first, second), skip in zip(self.up, reversed(skips)):
            x = ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)  # (N, 2h, 2w, C): back to the skip's size
            x = second(first(ops.concatenate([skip, ops.cast(x, skip.dtype)], axis=-1)))
        return self.logits(x)

    def get_config(self):
        return {**super().get_config(), "channels": list(self.channels)}


# ---------------------------------------------------------------------------------------------------------------
# Builders: the models of a configuration (run_state.Config), used by train.py, predict.py and the benchmarks alike
# ---------------------------------------------------------------------------------------------------------------


COSINE_FLOOR = 0.05  # where cosine_schedule ends, as a share of the initial rate


def cosine_schedule(learning_rate: float, epochs: int, steps_per_epoch: int):
    """Cosine decay to 5% of the initial rate over the whole run: the last epochs settle instead of jumping."""
    return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(epochs * steps_per_epoch, 1),
                                                  alpha=COSINE_FLOOR)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SpectralMSE(keras.losses.Loss):
    """Mean squared error + `weight` x the mean absolute difference of log(1 + |2-D FFT|) of the images: the
    amplitude spectrum's fine frequencies, which MSE lets a decoder leave out (its images come out soft, a tell a
    judge spots), weigh as much in log amplitude as the coarse ones. (N, H, W, 1) images -> (N,) losses.
    Brain VQ-VAEs with transformer priors (Tudosiu et al. 2022) train with a spectral term of this kind; weight 0
    is plain MSE."""

    def __init__(self, weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if not weight >= 0:
            raise ValueError(f"weight must be 0 or more, got {weight}")
        self.weight = float(weight)

    @staticmethod
    def log_amplitude(images):
        """(N, H, W, 1) -> (N, H, W) log(1 + |FFT|); the epsilon keeps the gradient finite where |FFT| is 0."""
        real, imag = ops.fft2((images[..., 0], ops.zeros_like(images[..., 0])))
        return ops.log1p(ops.sqrt(real ** 2 + imag ** 2 + 1e-8))

    def call(self, y_true, y_pred):
        y_true, y_pred = ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")
        loss = ops.mean((y_pred - y_true) ** 2, axis=(1, 2, 3))
        if self.weight:
            spectral = ops.abs(self.log_amplitude(y_pred) - self.log_amplitude(y_true))
            loss = loss + self.weight * ops.mean(spectral, axis=(1, 2))
        return loss

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}


def new_vqvae(config, steps_per_epoch: int, dtype: str = "float32", jit_compile: bool = False) -> VQVAE:
    """The VQ-VAE of a config, built and compiled for training (train.py seeds the backend before it).
    Call it inside a tf.distribute strategy's scope to train on several devices."""
    model = VQVAE(**config.vqvae_kwargs(), dtype=dtype)
    model.build((None, config.image_size, config.image_size, 1))
    schedule = cosine_schedule(config.learning_rate, config.whole_epochs, steps_per_epoch)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse",
                  metrics=[keras.metrics.MeanSquaredError(name="mse")], jit_compile=jit_compile)
    return model


def compile_for_sharpening(model: VQVAE, config, jit_compile: bool = False) -> None:
    """Sets a trained VQ-VAE up for its last `config.sharpen_epochs`: the decoder alone learns, with MSE +
    `config.spectral_loss` x SpectralMSE's spectral term, at the constant rate the cosine schedule ended at. The
    encoder and the codebook are frozen, so the codes (what the prior learns) stay those of the MSE epochs.
    A VQ-VAE reloaded from a sharpening epoch's checkpoint is left as it is. (Trained so from the first epoch,
    the spectral term teaches the decoder noise with the right spectrum: on the demo validation SSIM 0.918 and
    reconstructions told from real 100% of the time; docs/experiments.md.)"""
    if model.codes_frozen:
        return  # a checkpoint of the sharpening epochs: compiled so already, its optimizer state kept
    model.freeze_codes()
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate * COSINE_FLOOR),
                  loss=SpectralMSE(config.spectral_loss), metrics=[keras.metrics.MeanSquaredError(name="mse")],
                  jit_compile=jit_compile)


def new_prior(config, steps_per_epoch: int, dtype: str = "float32", jit_compile: bool = False) -> PixelCNNPrior:
    """The PixelCNN prior of a config, built and compiled for training on code grids (and, when conditioned, on
    slice_position_features of their slices)."""
    prior = PixelCNNPrior(**config.prior_kwargs(), dtype=dtype)
    prior.build(prior.pack_inputs((None, config.grid_size, config.grid_size), (None, prior.num_conditions),
                                  (None, *prior.layout_shape)))
    schedule = cosine_schedule(config.prior_learning_rate, config.prior_epochs, steps_per_epoch)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if prior.layout_levels:  # mean over codes + (layout cells / codes) * mean over cells = the codes' NLL per code
        loss = dict(loss={"codes": cross_entropy, "layout": cross_entropy},
                    loss_weights={"codes": 1.0, "layout": 1.0 / LAYOUT_POOL ** 2})
    else:
        loss = dict(loss=cross_entropy)
    prior.compile(optimizer=keras.optimizers.Adam(schedule), **loss, jit_compile=jit_compile)
    return prior


@keras.saving.register_keras_serializable(package=PACKAGE)
class WeightedCrossEntropy(keras.losses.Loss):
    """Sparse categorical cross-entropy from logits with a weight per class: CSF is a few percent of a slice, and
    unweighted a small segmenter never learns to call it (Dice 0 after minutes)."""

    def __init__(self, class_weights, **kwargs):
        super().__init__(**kwargs)
        self.class_weights = [float(w) for w in class_weights]

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "int32")
        per_pixel = ops.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        return per_pixel * ops.take(ops.convert_to_tensor(self.class_weights, per_pixel.dtype), y_true)

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights}


def new_segmenter(config, steps_per_epoch: int, class_weights=None, dtype: str = "float32",
                  jit_compile: bool = False) -> TissueSegmenter:
    """The tissue segmenter of a config, built and compiled for training on (slice, tissue label) pairs;
    class_weights: one per class of TISSUES (default: equal)."""
    halvings = min(2, (config.image_size & -config.image_size).bit_length() - 1)  # as often as the size halves
    model = TissueSegmenter([config.segmenter_channels * 2 ** level for level in range(halvings + 1)], dtype=dtype)
    model.build((None, config.image_size, config.image_size, 1))
    schedule = cosine_schedule(config.segmenter_learning_rate, config.segmenter_epochs, steps_per_epoch)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=WeightedCrossEntropy(class_weights or [1.0] * len(TISSUES)),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], jit_compile=jit_compile)
    return model


def full_precision(model):
    """The model itself if it computes in float32, else a float32 copy with the same weights (for evaluation and
    sampling, which run in full precision)."""
    if model.dtype_policy.name == "float32":
        return model
    copy = type(model).from_config({**model.get_config(), "dtype": "float32"})
    copy.build_from_config(model.get_build_config())
    copy.set_weights(model.get_weights())
    return copy
