"""Training speed, and quality per second, of the project's VQ-VAE against the Keras-example architecture.

    python -m benchmarks.train_throughput                # defaults sized for a 2-core CPU (about 8 minutes)
    python -m benchmarks.train_throughput --batch 128    # the OASIS batch, on a GPU

(a) Images/s of one training step at 256 px, same batch, same images: the project's OASIS preset with XLA on, the
    same with XLA off, and the Keras example's architecture (keras.io/examples/generative/vq_vae: two stride-2 3x3
    convolutions 32/64, a 1x1 convolution to D, two stride-2 transposed convolutions back, a 3x3 one to the image;
    the seed's K=32 codes of D=128). Each model is timed in several rounds, interleaved with the others so that
    load from other processes hits all alike; the best round counts.
(b) Test SSIM on the demo set after the same wall-clock budget of training (tracing and compiling included):
    the project's demo preset as train.py runs it (restarts of unused codes, its learning-rate schedule, which is
    set for 25 epochs and so has not decayed when the budget runs out) against the Keras-example architecture
    with the example's settings (Adam 1e-3, MSE divided by the training variance + VQ loss), same images, same
    batch, same image size.

The last line is JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

import dataset
import modules
import run_state
import train
import utils
from benchmarks.deadline import StopAt


def keras_example_vqvae(image_size: int, variance: float, num_embeddings: int = 32, embedding_dim: int = 128,
                        seed: int = 0) -> keras.Model:
    """The Keras example's VQ-VAE on 1-channel images, compiled as the example trains it."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((image_size, image_size, 1))
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(images)
    x = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(embedding_dim, 1, padding="same")(x)  # (N, H/4, W/4, D)
    x = modules.VectorQuantizer(num_embeddings, embedding_dim, commitment_cost=0.25)(x)
    x = layers.Conv2DTranspose(64, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu")(x)
    outputs = layers.Conv2DTranspose(1, 3, padding="same")(x)
    model = keras.Model(images, outputs, name="keras_example_vqvae")

    def reconstruction_loss(y_true, y_pred):  # the example divides the MSE by the variance of the training set
        return ops.mean(ops.square(y_true - y_pred)) / variance

    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=reconstruction_loss)
    return model


def images_per_second(models: dict, images: np.ndarray, steps: int, rounds: int) -> dict:
    """Best-of-rounds training images/s of each compiled model on the same batch, rounds interleaved."""
    batch = tf.data.Dataset.from_tensors((images, images))
    for name, model in models.items():
        start = time.perf_counter()
        model.fit(batch, verbose=0, shuffle=False)  # traces, and compiles with XLA where asked
        print(f"  {name}: first step (tracing/compiling) {time.perf_counter() - start:.1f} s")
    best = {name: 0.0 for name in models}
    for round_ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(batch.repeat(steps), verbose=0, shuffle=False)
            best[name] = max(best[name], steps * len(images) / (time.perf_counter() - start))
        print(f"  round {round_ + 1}: " + ", ".join(f"{n} {v:.2f}" for n, v in best.items()) + " images/s (best)")
    return best


def ssim_after_budget(model, data, test_images: np.ndarray, seconds: float, callbacks=()) -> tuple[float, int]:
    stop = StopAt(seconds=seconds)
    model.fit(data, epochs=10_000, callbacks=[stop, *callbacks], verbose=0, shuffle=False)
    recon = np.clip(model.predict(test_images, batch_size=64, verbose=0), 0.0, 1.0)
    return float(np.mean(utils.ssim(test_images, recon))), stop.steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="batch of the 256 px throughput test (default 16)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed round (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per model (default 3)")
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per model in (b) (default 120)")
    parser.add_argument("--data-dir", default=run_state.DEMO_PRESET["data_dir"], help="the demo set (built if missing)")
    args = parser.parse_args(argv)
    if not Path(args.data_dir).exists():
        dataset.make_demo(args.data_dir)
    train_files = dataset.split_files(args.data_dir, "train")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, GPUs: {len(tf.config.list_physical_devices('GPU'))}"
    print(f"machine: {machine}")

    # (a) throughput at 256 px
    oasis = dataclasses.replace(run_state.Config(), batch_size=args.batch)
    images = dataset.load_images(train_files[:args.batch], oasis.image_size)
    variance = float(np.var(images))
    print(f"(a) training images/s at {oasis.image_size} px, batch {args.batch}, {args.rounds} rounds of "
          f"{args.steps} steps")
    models = {"project_xla": modules.new_vqvae(oasis, steps_per_epoch=100, jit_compile=True),
              "project_no_xla": modules.new_vqvae(oasis, steps_per_epoch=100, jit_compile=False),
              "keras_example": keras_example_vqvae(oasis.image_size, variance)}
    parameters = {name: model.count_params() for name, model in models.items()}
    print(f"  parameters: project {parameters['project_xla']:,}, Keras example {parameters['keras_example']:,}")
    speed = images_per_second(models, images, args.steps, args.rounds)
    default_xla = "on" if speed["project_xla"] > speed["project_no_xla"] else "off"

    # (b) quality after the same budget on the demo set
    demo = run_state.Config(**run_state.DEMO_PRESET)
    data = dataset.make_dataset(train_files, demo.image_size, demo.batch_size, shuffle=True, seed=demo.seed)
    test_images = dataset.load_images(dataset.split_files(args.data_dir, "test"), demo.image_size)
    train_sample = dataset.load_images(train_files[::6], demo.image_size)
    variance = float(np.var(np.concatenate([x for x, _ in data])))
    floors = {name: float(np.mean(utils.ssim(test_images, images)))
              for name, images in utils.floor_images(test_images, demo.downsample).items()}
    print(f"(b) test SSIM after {args.budget:.0f} s of training on {len(train_files)} demo slices at "
          f"{demo.image_size} px, batch {demo.batch_size} (floors: "
          + ", ".join(f"{k} {v:.3f}" for k, v in floors.items()) + ")")
    steps_per_epoch = int(np.ceil(len(train_files) / demo.batch_size))
    project = modules.new_vqvae(demo, steps_per_epoch)  # XLA off: train.py's default on CPU, measured in (a)
    project_ssim, project_steps = ssim_after_budget(project, data, test_images, args.budget,
                                                    [train.RestartUnusedCodes(train_sample, demo.seed)])
    print(f"  project demo preset: SSIM {project_ssim:.4f} after {project_steps} steps")
    example = keras_example_vqvae(demo.image_size, variance)
    example_ssim, example_steps = ssim_after_budget(example, data, test_images, args.budget)
    print(f"  Keras example: SSIM {example_ssim:.4f} after {example_steps} steps")

    print(f"at 256 px the project trains {speed['project_no_xla'] / speed['keras_example']:.2f}x as many images/s as "
          f"the Keras example; XLA changes its speed {speed['project_xla'] / speed['project_no_xla']:.2f}x, so XLA "
          f"{default_xla} is the faster here; after {args.budget:.0f} s the project reaches test SSIM "
          f"{project_ssim:.3f}, the Keras example {example_ssim:.3f}")
    print(json.dumps({
        "benchmark": "train_throughput", "image_size": oasis.image_size, "batch": args.batch,
        "project_images_per_s": round(speed["project_xla"], 2),
        "project_no_xla_images_per_s": round(speed["project_no_xla"], 2),
        "keras_example_images_per_s": round(speed["keras_example"], 2),
        "xla_speedup": round(speed["project_xla"] / speed["project_no_xla"], 3), "faster_xla_setting": default_xla,
        "budget_s": args.budget, "budget_image_size": demo.image_size, "budget_batch": demo.batch_size,
        "project_ssim_at_budget": round(project_ssim, 4), "keras_example_ssim_at_budget": round(example_ssim, 4),
        "project_parameters": parameters["project_xla"], "keras_example_parameters": parameters["keras_example"],
        "project_steps_in_budget": project_steps, "keras_example_steps_in_budget": example_steps,
        "ssim_floors": {k: round(v, 4) for k, v in floors.items()}, "machine": machine}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
