"""Evaluates a trained run: reconstructs a split and reports SSIM and PSNR beside their trivial baselines.

    python predict.py                            # the newest run in runs/, its test split
    python predict.py --run runs/NAME --split validate --data-dir PATH

Everything is rebuilt from the run folder (config.json, vqvae.keras). Writes ssim_hist.png, recon_SPLIT.png and
the `reconstruction` section of metrics.json into the run folder.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: hide its C++ start-up chatter

import argparse
import sys
from pathlib import Path

import keras
import numpy as np

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
    return parser.parse_args(argv)


def load_vqvae(run_dir: Path):
    path = run_dir / "vqvae.keras"
    if not path.is_file():
        raise UserError(f"{run_dir} has no vqvae.keras; train the VQ-VAE first (python train.py) or pick another "
                        "--run")
    import modules  # noqa: F401  registers the custom layers for load_model

    return keras.saving.load_model(path)


def score(real: np.ndarray, fake: np.ndarray) -> dict:
    """SSIM over the whole image, SSIM on the brain's bounding box, PSNR: each as mean / median / min."""
    return {"ssim": utils.summarize(utils.ssim(real, fake)),
            "ssim_brain_crop": utils.summarize(utils.ssim_brain_crop(real, fake)),
            "psnr": utils.summarize(utils.psnr(real, fake))}


def evaluate_reconstruction(run_dir: Path, config: utils.Config, data_dir: str, split: str) -> dict:
    model = load_vqvae(run_dir)
    files = dataset.split_files(data_dir, split)
    images = dataset.load_images(files, config.image_size)
    recon, _ = utils.reconstruct(model, images)
    candidates = {
        "vqvae": recon,
        f"bilinear_x{config.downsample}": utils.bilinear_baseline(images, config.downsample),
        "all_black": np.zeros_like(images),
    }
    results = {name: score(images, output) for name, output in candidates.items()}

    print(f"{split} split of {data_dir}: {len(images)} slices at {config.image_size} px")
    print(f"{'':>14} {'SSIM mean':>10} {'median':>8} {'min':>8}  {'brain-crop SSIM':>15} {'PSNR dB':>8}")
    for name, r in results.items():
        print(f"{name:>14} {r['ssim']['mean']:>10.4f} {r['ssim']['median']:>8.4f} {r['ssim']['min']:>8.4f}  "
              f"{r['ssim_brain_crop']['mean']:>15.4f} {r['psnr']['mean']:>8.2f}")

    utils.plot_histogram(run_dir / "ssim_hist.png",
                         {name: utils.ssim(images, output) for name, output in candidates.items()},
                         "SSIM per slice", f"Reconstruction SSIM, {split} split ({len(images)} slices)")
    show = np.linspace(0, len(images) - 1, 8).astype(int)
    utils.plot_image_rows(run_dir / f"recon_{split}.png",
                          {f"{split} originals": images[show], "VQ-VAE reconstructions": recon[show],
                           f"bilinear x{config.downsample} down/up (baseline)":
                               candidates[f"bilinear_x{config.downsample}"][show]})
    section = {"split": split, "data_dir": str(data_dir), "num_images": len(images), **results}
    utils.update_metrics(run_dir, "reconstruction", section)
    return section


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_dir = Path(args.run) if args.run else utils.newest_run(args.runs_dir)
        config = utils.load_run_config(run_dir)
        print(f"run: {run_dir}")
        evaluate_reconstruction(run_dir, config, args.data_dir or config.data_dir, args.split)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
