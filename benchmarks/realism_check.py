"""Can the realism test fail? The classifier two-sample test (realism.c2st) that predict.py headlines, run on sets whose
answer is known: real against real (should be about 0.5), and real against obviously wrong sets (blurred to what
the code grid's size keeps, pixels shuffled, blank, a blob of the brain's mean shape: should be near 1.0), against
real slices smoothed by 0.7 px, which no eye notices and a judge of fine texture should, and against real slices
whose brain interior is cut into 8x8 tiles shuffled among themselves (outline and intensities kept, anatomy not:
what today's blotchy samples look like).
With --run, the run's VQ-VAE reconstructions join the table.

    python -m benchmarks.realism_check                       # the demo set (built if missing), 128 px
    python -m benchmarks.realism_check --run runs/demo       # + that run's reconstructions

Real against real, two ways. "real": the held-out subjects (validation and test together) dealt at random into two
halves, --deals times, each deal judged by judges of its own, the accuracy over every deal's judgments: whether the
judge calls two sets of real subjects alike, its known answer 0.5. "real_val_vs_test": the validation split against
the test split, which predict.py shows beside the samples: one such deal, fixed, so it carries the chance difference
of these two sets of subjects too. Two sets of 48 demo subjects differ enough for the judge to see: single deals
read 0.46 to 0.58, the validation split 0.56 (docs/experiments.md); the interval resamples subjects within the deals,
not the deals. Every other set is made from the validation slices and judged against the test split, as predict.py
judges samples. The last line is JSON, with "known": the accuracy of each known-answer set, "p_value" beside it, and
"real_deals": each deal's accuracy.
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


REAL_DEALS = 5  # one deal of 48 + 48 demo subjects read 0.46 to 0.58: the mean of 5 is good to about +-0.04


def dealt_halves(images: np.ndarray, subjects: np.ndarray, deals: int, rng) -> tuple:
    """`deals` random deals of the subjects into two halves (a subject's slices stay together): (the first halves'
    images, one array a deal; the second halves'; (the first halves' subjects, the second halves')), as
    realism.c2st takes draws judged against a second set of their own."""
    names = np.unique(subjects)
    firsts, seconds = [], []
    for _ in range(deals):
        first = np.isin(subjects, rng.permutation(names)[:len(names) // 2])
        firsts.append(first)
        seconds.append(~first)
    return ([images[m] for m in firsts], [images[m] for m in seconds],
            ([subjects[m] for m in firsts], [subjects[m] for m in seconds]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=run_state.DEMO_PRESET["data_dir"], help="data (default: the demo set)")
    parser.add_argument("--image-size", type=int, default=run_state.DEMO_PRESET["image_size"])
    parser.add_argument("--run", help="a run folder: its VQ-VAE's reconstructions are judged too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judges", type=int, default=realism.C2ST_JUDGES,
                        help=f"judges a fold (default {realism.C2ST_JUDGES}, as predict.py; 1: a third of the time)")
    parser.add_argument("--deals", type=int, default=REAL_DEALS,
                        help=f"random deals of the held-out subjects into two halves that 'real' judges (default "
                             f"{REAL_DEALS})")
    args = parser.parse_args(argv)
    for name, value in (("--judges", args.judges), ("--deals", args.deals)):
        if value < 1:
            parser.error(f"{name} must be 1 or more, got {value}")
    if not Path(args.data_dir).exists():
        dataset.make_demo(args.data_dir)
    files = {split: dataset.split_files(args.data_dir, split) for split in ("validate", "test")}
    images = {split: dataset.load_images(names, args.image_size) for split, names in files.items()}
    subjects = {split: dataset.slice_subjects(names) for split, names in files.items()}
    val, test = images["validate"], images["test"]
    rng = np.random.default_rng(args.seed)
    mean_shape = (val > utils.BRAIN_THRESHOLD).mean(axis=0) * val[val > utils.BRAIN_THRESHOLD].mean()
    held_out = np.array([f"image {i}" for i in range(len(val) + len(test))])  # names without subjects: images
    if all(ids is not None for ids in subjects.values()):
        held_out = np.concatenate([subjects["validate"], subjects["test"]])
    halves = dealt_halves(np.concatenate([val, test]), held_out, args.deals,
                          np.random.default_rng([args.seed, 1]))  # rng's draws below stay as they were
    sets = {  # key in the JSON's "known": (label, images[, the set it is judged against, groups]): the test split
        "real": (f"real subjects, random halves, {args.deals} deals (the ideal: 0.5)", *halves),
        "real_val_vs_test": ("real validation slices (predict.py's reference)", val),
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
    for key, (label, candidate, *against) in sets.items():
        start = time.perf_counter()
        # every set but "real" is made from the validation slices and judged against the test slices
        against, groups = against or (test, (subjects["validate"], subjects["test"]))
        result = realism.c2st(candidate, against, groups=groups, seed=args.seed, judges=args.judges)
        results[key] = result
        low, high = result["ci95"]
        deals = result["draws"]
        each = f"deals {' '.join(f'{a:.3f}' for a in deals)}, sd {np.std(deals, ddof=1):.3f}; " if len(deals) > 1 else ""
        print(f"{label:>58}: {result['accuracy']:.3f} [{low:.3f}, {high:.3f}], p {result['p_value']:.2g}  "
              f"({each}{time.perf_counter() - start:.0f} s)")
    print(json.dumps({"benchmark": "realism_check", "data_dir": args.data_dir, "image_size": args.image_size,
                      "n_per_set": min(len(val), len(test)), "judges": args.judges,
                      "known": {key: round(r["accuracy"], 3) for key, r in results.items()},
                      "ci95": {key: [round(v, 3) for v in r["ci95"]] for key, r in results.items()},
                      "p_value": {key: float(f"{r['p_value']:.3g}") for key, r in results.items()},
                      "real_deals": [round(a, 3) for a in results["real"]["draws"]],
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
