"""Evaluates a trained run and generates new brains from it.

    python predict.py                            # the newest run in runs/: reconstruction metrics + 16 samples
    python predict.py --run runs/NAME --num-samples 64 --temperature 0.9 --seed 1
    python predict.py --run runs/NAME --split validate --data-dir PATH

Everything is rebuilt from the run folder alone (config.json, vqvae.keras, prior.keras). Writes, into the run:
    ssim_hist.png, recon_SPLIT.png     reconstruction SSIM per slice and a grid, beside the trivial baselines
    samples.png, samples/*.png         generated slices (when the run has a prior)
    metrics.json                       `reconstruction` and `samples` sections
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: hide its C++ start-up chatter

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

import dataset
import utils
from utils import UserError


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


def score(real: np.ndarray, fake: np.ndarray, ssim: np.ndarray) -> dict:
    """SSIM over the whole image (given per image), SSIM on the brain's bounding box, PSNR: each as
    mean / median / min."""
    return {"ssim": utils.summarize(ssim),
            "ssim_brain_crop": utils.summarize(utils.ssim_brain_crop(real, fake)),
            "psnr": utils.summarize(utils.psnr(real, fake))}


def evaluate_reconstruction(run_dir: Path, config: utils.Config, vqvae, images: np.ndarray, split: str,
                            data_dir: str) -> tuple[dict, np.ndarray]:
    """Reconstruction metrics of the VQ-VAE beside its baselines; returns them and the code grids."""
    recon, codes = utils.reconstruct(vqvae, images)
    bilinear = f"bilinear_x{config.downsample}"
    candidates = {"vqvae": recon, bilinear: utils.bilinear_baseline(images, config.downsample),
                  "all_black": np.zeros_like(images)}
    ssim = {name: utils.ssim(images, output) for name, output in candidates.items()}  # (N,) per candidate
    results = {name: score(images, output, ssim[name]) for name, output in candidates.items()}

    print(f"reconstruction, {split} split of {data_dir}: {len(images)} slices at {config.image_size} px")
    print(f"{'':>14} {'SSIM mean':>10} {'median':>8} {'min':>8}  {'brain-crop SSIM':>15} {'PSNR dB':>8}")
    for name, r in results.items():
        print(f"{name:>14} {r['ssim']['mean']:>10.4f} {r['ssim']['median']:>8.4f} {r['ssim']['min']:>8.4f}  "
              f"{r['ssim_brain_crop']['mean']:>15.4f} {r['psnr']['mean']:>8.2f}")

    utils.plot_histogram(run_dir / "ssim_hist.png", ssim, "SSIM per slice",
                         f"Reconstruction SSIM, {split} split ({len(images)} slices)")
    show = np.linspace(0, len(images) - 1, 8).astype(int)
    utils.plot_image_rows(run_dir / f"recon_{split}.png",
                          {f"{split} originals": images[show], "VQ-VAE reconstructions": recon[show],
                           f"bilinear x{config.downsample} down/up (baseline)": candidates[bilinear][show]})
    section = {"split": split, "data_dir": str(data_dir), "num_images": len(images), **results}
    utils.update_metrics(run_dir, "reconstruction", section)
    return section, codes


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def make_sampler(prior, num_samples: int, temperature: float, seed: int):
    """A compiled function () -> (num_samples, H, W) int32 codes of the prior's grid. The whole autoregressive loop is one
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


def bits_per_code(prior, codes: np.ndarray, batch_size: int = 64) -> float:
    """Mean negative log-likelihood of code grids under the prior, in bits per code."""
    total = 0.0
    for start in range(0, len(codes), batch_size):
        batch = codes[start:start + batch_size].astype("int32")
        logits = prior(batch)
        total += -float(tf.reduce_sum(tfp.distributions.Categorical(logits=logits).log_prob(batch)))
    return total / codes.size / np.log(2)


def generate(run_dir: Path, config: utils.Config, vqvae, test_images: np.ndarray, test_codes: np.ndarray,
             num_samples: int, temperature: float, seed: int) -> dict:
    prior = utils.load_model(run_dir / "prior.keras", float32=True)  # sampled in full precision
    if prior.num_embeddings != vqvae.num_embeddings:
        raise UserError(f"{run_dir / 'prior.keras'} predicts {prior.num_embeddings} codes but the VQ-VAE has "
                        f"{vqvae.num_embeddings}; retrain the prior with `python train.py --stage prior --run {run_dir}`")
    sampler = make_sampler(prior, num_samples, temperature, seed)
    start = time.time()
    codes = sampler().numpy()
    seconds = time.time() - start
    samples = np.asarray(vqvae.decode(codes))
    print(f"generated {num_samples} brains ({config.grid_size}x{config.grid_size} codes, temperature "
          f"{temperature}, seed {seed}) in {seconds:.1f} s, compilation included")

    out = run_dir / "samples"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for i, image in enumerate(samples):
        utils.save_png(out / f"sample_{i:03d}.png", image)
    utils.plot_image_rows(run_dir / "samples.png",
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
        "prior_test_bits_per_code": bits_per_code(prior, test_codes),
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
    utils.update_metrics(run_dir, "samples", section)
    return section


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.num_samples <= 0:
            raise UserError(f"--num-samples must be a positive integer, got {args.num_samples}")
        run_dir = Path(args.run) if args.run else utils.newest_run(args.runs_dir)
        config = utils.load_run_config(run_dir)
        print(f"run: {run_dir}")
        vqvae = utils.load_model(run_dir / "vqvae.keras", float32=True)  # evaluated in full precision
        data_dir = args.data_dir or config.data_dir
        images = dataset.load_images(dataset.split_files(data_dir, args.split), config.image_size)
        _, codes = evaluate_reconstruction(run_dir, config, vqvae, images, args.split, data_dir)
        if (run_dir / "prior.keras").is_file():
            generate(run_dir, config, vqvae, images, codes, args.num_samples, args.temperature,
                     config.seed if args.seed is None else args.seed)
        else:
            print(f"{run_dir} has no prior.keras yet, so no samples: `python train.py --stage prior --run {run_dir}`")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
