"""Evaluates a trained run and generates new brains from it.

    python predict.py                            # the newest run in runs/: reconstruction metrics + 16 samples
    python predict.py --run runs/NAME --num-samples 64 --temperature 0.9 --seed 1
    python predict.py --run runs/NAME --split validate --data-dir PATH

Everything is rebuilt from the run folder alone (config.json, vqvae.keras, prior.keras). Writes, into the run:
    ssim_hist.png, recon_SPLIT.png     reconstruction SSIM per slice and a grid, beside the trivial floors
    samples.png, samples/*.png         generated slices (when the run has a prior)
    metrics.json                       `reconstruction` and `samples` sections
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no INFO/WARNING lines from its C++

import argparse
import sys
import time

import numpy as np

import utils

with utils.native_stderr_captured():  # TensorFlow's C++ start-up lines
    import tensorflow as tf
    import tensorflow_probability as tfp

import dataset
from utils import Run, UserError


def main(argv: list[str] | None = None) -> int:
    return utils.script_main(evaluate_and_generate, argv)


def evaluate_and_generate(argv: list[str] | None = None) -> None:
    """Reconstruction metrics of the run's VQ-VAE on a split; then, if the run has a prior, samples and their
    metrics."""
    args = parse_args(argv)
    if args.num_samples <= 0:
        raise UserError(f"--num-samples must be a positive integer, got {args.num_samples}")
    run = Run.open(args.run) if args.run else Run.newest(args.runs_dir)
    config = run.read_config()
    print(f"run: {run.path}")
    vqvae = run.stage("vqvae").load_model(float32=True)  # evaluated in full precision
    data_dir = args.data_dir or config.data_dir
    images = dataset.load_images(dataset.split_files(data_dir, args.split), config.image_size)
    codes = evaluate_reconstruction(run, config, vqvae, images, args.split, data_dir)
    if run.stage("prior").has_checkpoint:
        generate(run, config, vqvae, images, codes, args.num_samples, args.temperature,
                 config.seed if args.seed is None else args.seed)
    else:
        print(f"{run.path} has no prior yet, so no samples: `python train.py --resume {run.path} --stage prior`")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run", help="run folder (default: the newest run under --runs-dir)")
    parser.add_argument("--runs-dir", default="runs", help="where to look for the newest run (default runs)")
    parser.add_argument("--data-dir", help="data to evaluate on (default: the run's own data_dir)")
    parser.add_argument("--split", choices=dataset.SPLITS, default="test", help="split to reconstruct (default test)")
    parser.add_argument("--num-samples", type=int, default=16, help="brains to generate (default 16)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="divides the prior's logits; below 1 is more conservative, 0 takes the argmax")
    parser.add_argument("--seed", type=int, help="sampling seed (default: the run's seed); same seed, same samples")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------------------------


def evaluate_reconstruction(run: Run, config: utils.Config, vqvae, images: np.ndarray, split: str,
                            data_dir: str) -> np.ndarray:
    """Reconstruction metrics of the VQ-VAE beside its floors, into metrics.json; returns the code grids."""
    recon, codes = utils.reconstruct(vqvae, images)
    candidates = {"vqvae": recon, **utils.floor_images(images, config.downsample)}
    results = {name: utils.reconstruction_scores(images, output) for name, output in candidates.items()}

    print(f"reconstruction, {split} split of {data_dir}: {len(images)} slices at {config.image_size} px")
    print(f"{'':>14} {'SSIM mean':>10} {'median':>8} {'min':>8}  {'brain-crop SSIM':>15} {'PSNR dB':>8}")
    for name, r in results.items():
        print(f"{name:>14} {r['ssim']['mean']:>10.4f} {r['ssim']['median']:>8.4f} {r['ssim']['min']:>8.4f}  "
              f"{r['ssim_brain_crop']['mean']:>15.4f} {r['psnr']['mean']:>8.2f}")

    utils.plot_histogram(run.figure("ssim_hist"), {name: utils.ssim(images, output)
                                                   for name, output in candidates.items()},
                         "SSIM per slice", f"Reconstruction SSIM, {split} split ({len(images)} slices)")
    show = np.linspace(0, len(images) - 1, 8).astype(int)
    bilinear = utils.floor_name(config.downsample)
    utils.plot_image_rows(run.figure(f"recon_{split}"),
                          {f"{split} originals": images[show], "VQ-VAE reconstructions": recon[show],
                           f"{utils.floor_label(bilinear)} (floor)": candidates[bilinear][show]})
    run.update_metrics("reconstruction", {"split": split, "data_dir": str(data_dir), "num_images": len(images),
                                          **results})
    return codes


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def make_sampler(prior, num_samples: int, temperature: float, seed: int):
    """A compiled function () -> (num_samples, H, W) int32 code grids. The whole autoregressive loop is one
    tf.function graph; each position draws from tfp Categorical(logits / temperature) with a stateless seed
    derived from (seed, position), so the same seed gives the same samples."""
    if temperature < 0:
        raise UserError(f"--temperature must be 0 or more, got {temperature}")
    base_seed = tf.constant([seed, 0], tf.int32)

    def draw(logits, position):
        if temperature == 0:
            return tf.argmax(logits, axis=-1, output_type=tf.int32)
        position_seed = tf.random.experimental.stateless_fold_in(base_seed, tf.cast(position, tf.int32))
        return tfp.distributions.Categorical(logits=logits / temperature).sample(seed=position_seed)

    return tf.function(lambda: prior.sample(num_samples, draw))


def generate(run: Run, config: utils.Config, vqvae, test_images: np.ndarray, test_codes: np.ndarray,
             num_samples: int, temperature: float, seed: int) -> dict:
    prior = run.stage("prior").load_model(float32=True)  # sampled in full precision
    if prior.num_embeddings != vqvae.num_embeddings:
        raise UserError(f"{run.stage('prior').checkpoint} predicts {prior.num_embeddings} codes but the VQ-VAE has "
                        f"{vqvae.num_embeddings}; retrain the prior with `python train.py --resume {run.path} "
                        "--stage prior --retrain`")
    sampler = make_sampler(prior, num_samples, temperature, seed)
    start = time.time()
    codes = sampler().numpy()
    seconds = time.time() - start
    samples = np.asarray(vqvae.decode(codes))
    print(f"generated {num_samples} brains ({config.grid_size}x{config.grid_size} codes, temperature "
          f"{temperature}, seed {seed}) in {seconds:.1f} s, compilation included")

    run.write_samples(samples)
    utils.plot_image_rows(run.figure("samples"),
                          {f"samples {r * 8 + 1}-{min(r * 8 + 8, num_samples)}": samples[r * 8:r * 8 + 8]
                           for r in range((num_samples + 7) // 8)},
                          title=f"PixelCNN samples, temperature {temperature}, seed {seed}")

    # How close to real brains, and not copies: the same figures for real validation slices are the reference.
    train_images = dataset.load_images(dataset.split_files(config.data_dir, "train"), config.image_size)
    val_images = dataset.load_images(dataset.split_files(config.data_dir, "validate"), config.image_size)
    section = {
        "num_samples": num_samples, "temperature": temperature, "seed": seed, "sampling_seconds": round(seconds, 2),
        "samples_nearest_test_ssim": utils.summarize(utils.nearest_ssim(samples, test_images)),
        "samples_nearest_train_ssim": utils.summarize(utils.nearest_ssim(samples, train_images)),
        "real_val_nearest_test_ssim": utils.summarize(utils.nearest_ssim(val_images, test_images)),
        "real_val_nearest_train_ssim": utils.summarize(utils.nearest_ssim(val_images, train_images)),
        "samples_brain_fraction": utils.summarize(utils.brain_fraction(samples)),
        "real_val_brain_fraction": utils.summarize(utils.brain_fraction(val_images)),
        "prior_test_bits_per_code": utils.bits_per_code(prior, test_codes),
        "uniform_bits_per_code": float(np.log2(config.num_embeddings)),
    }
    ratio = section["samples_nearest_test_ssim"]["mean"] / section["real_val_nearest_test_ssim"]["mean"]
    section["nearest_test_ssim_ratio"] = ratio
    print(f"{'mean nearest-real SSIM':>26}  {'vs test':>8}  {'vs train (copy check)':>22}  {'brain area':>10}")
    for label, key in [("generated samples", "samples"), ("real validation slices", "real_val")]:
        print(f"{label:>26}  {section[key + '_nearest_test_ssim']['mean']:>8.4f}  "
              f"{section[key + '_nearest_train_ssim']['mean']:>22.4f}  {section[key + '_brain_fraction']['mean']:>10.1%}")
    print(f"samples reach {ratio:.1%} of the real slices' nearest-test SSIM; prior NLL on the test split "
          f"{section['prior_test_bits_per_code']:.3f} bits/code (uniform {section['uniform_bits_per_code']:.1f})")
    run.update_metrics("samples", section)
    return section


if __name__ == "__main__":
    sys.exit(main())
