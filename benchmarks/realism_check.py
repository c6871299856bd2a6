"""Can the realism test fail? The classifier two-sample test (realism.c2st) that predict.py headlines, run on sets whose
answer is known: real against real (should be about 0.5), and real against obviously wrong sets (blurred to what
the code grid's size keeps, pixels shuffled, blank, a blob of the brain's mean shape: should be near 1.0), against
real slices smoothed by 0.7 px, which no eye notices and a judge of fine texture should, and against real slices
whose brain interior is cut into 8x8 tiles shuffled among themselves (outline and intensities kept, anatomy not:
what today's blotchy samples look like).
With --run, the run's VQ-VAE reconstructions join the table.

    python -m benchmarks.realism_check                       # the demo set (built if missing), 128 px
    python -m benchmarks.realism_check --run runs/demo       # + that run's reconstructions

Real sets: the validation split against the test split (different subjects), as predict.py does. The last line is
JSON, with "known": the accuracy of each known-answer set, and "p_value" beside it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

import dataset
import realism
import run_state
import utils


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=run_state.DEMO_PRESET["data_dir"], help="data (default: the demo set)")
    parser.add_argument("--image-size", type=int, default=run_state.DEMO_PRESET["image_size"])
    parser.add_argument("--run", help="a run folder: its VQ-VAE's reconstructions are judged too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judges", type=int, default=realism.C2ST_JUDGES,
                        help=f"judges a fold (default {realism.C2ST_JUDGES}, as predict.py; 1: a third of the time)")
    args = parser.parse_args(argv)
    if args.judges < 1:
        parser.error(f"--judges must be 1 or more, got {args.judges}")
    if not Path(args.data_dir).exists():
        dataset.make_demo(args.data_dir)
    files = {split: dataset.split_files(args.data_dir, split) for split in ("validate", "test")}
    images = {split: dataset.load_images(names, args.image_size) for split, names in files.items()}
    subjects = {split: dataset.slice_subjects(names) for split, names in files.items()}
    val, test = images["validate"], images["test"]
    rng = np.random.default_rng(args.seed)
    mean_shape = (val > utils.BRAIN_THRESHOLD).mean(axis=0) * val[val > utils.BRAIN_THRESHOLD].mean()
    sets = {  # key in the JSON's "known": (label, images)
        "real": ("real validation slices (the ideal: 0.5)", val),
        "bilinear": ("validation slices blurred to bilinear x4 down/up", utils.bilinear_baseline(val, 4)),
        # the hard one: no eye sees a blur of 0.7 px, but a judge that looks at fine texture must
        "smoothed": ("validation slices smoothed by a 0.7 px Gaussian", ndimage.gaussian_filter(val, (0, 0.7, 0.7, 0))),
        "interior_shuffled": ("validation slices, brain interior in 8x8 tiles shuffled",
                              realism.interior_shuffled(val, rng)),
        "pixels_shuffled": ("validation slices, pixels shuffled",
                            np.stack([v.reshape(-1)[rng.permutation(v.size)].reshape(v.shape) for v in val])),
        "blank": ("blank (all black)", np.zeros_like(val)),
        "blob": ("the mean brain-shaped blob, plus noise",
                 np.clip(mean_shape[None] + rng.normal(0, 0.05, val.shape), 0, 1)),
    }
    if args.run:
        vqvae = run_state.Run.open(args.run).load_vqvae()
        sets["reconstructions"] = (f"VQ-VAE reconstructions of the validation slices ({args.run})",
                                   utils.reconstruct(vqvae, val)[0])
    print(f"C2ST against the {len(test)} test slices ({args.data_dir}, {args.image_size} px); 0.5 = cannot be told "
          "apart, 1.0 = always")
    results = {}
    for key, (label, candidate) in sets.items():
        start = time.perf_counter()
        groups = (subjects["validate"], subjects["test"])  # every set here is made from the validation slices
        result = realism.c2st(candidate, test, groups=groups, seed=args.seed, judges=args.judges)
        results[key] = result
        low, high = result["ci95"]
        print(f"{label:>58}: {result['accuracy']:.3f} [{low:.3f}, {high:.3f}], p {result['p_value']:.2g}  "
              f"({time.perf_counter() - start:.0f} s)")
    print(json.dumps({"benchmark": "realism_check", "data_dir": args.data_dir, "image_size": args.image_size,
                      "n_per_set": min(len(val), len(test)), "judges": args.judges,
                      "known": {key: round(r["accuracy"], 3) for key, r in results.items()},
                      "ci95": {key: [round(v, 3) for v in r["ci95"]] for key, r in results.items()},
                      "p_value": {key: float(f"{r['p_value']:.3g}") for key, r in results.items()},
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
