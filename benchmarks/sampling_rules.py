"""Which sampling rule (temperature, top-k, classifier-free guidance) makes the most real-looking samples, chosen on the
validation split alone, so that predict.py's realism test on the test split stays an unseen judgment.

    python -m benchmarks.sampling_rules --run runs/base --temperatures 0.9 1.0 --top-k 0 16 4
    python -m benchmarks.sampling_rules --run runs/cfg --guidance 1 2 3    # a prior trained with condition dropout

For each rule: samples drawn at the depths of the validation slices, judged against them (the C2ST of realism.py,
with all of them: on half the validation subjects the judge had no power) and their tissue report against them. The
ideal, and the tissue report's floor: the slices of as many training subjects as validation holds, judged the same
way (fresh judges never saw them; the segmenter did, so its floor may read a little low). The rule with the lowest
C2ST accuracy is chosen.
Nothing of the test split is read. The last line is JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np

import dataset
import predict
import realism
import run_state
import utils
from utils import UserError

TISSUE_ERRORS = ("tissue_fraction_error", "tissue_map_error", "shape_error")
IDEAL = "real training slices"


def times_floor(error: float, floor: float) -> float | None:
    """error / floor; 1 where both are equal (real slices against themselves, even where a tiny run's segmenter
    finds no tissue and both are 0); None where only the floor is 0."""
    return 1.0 if error == floor else error / floor if floor else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run folder with a trained prior (and segmenter)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0],
                        help="guidance scales (other than 1 only for a prior trained with condition dropout)")
    parser.add_argument("--data-dir", help="the data whose validation split is used (default: the run's own)")
    parser.add_argument("--top-k", type=int, nargs="+", default=[0], help="top-k values (0: every code)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judges", type=int, default=realism.C2ST_JUDGES,
                        help=f"judges a fold (default {realism.C2ST_JUDGES}, as predict.py; 1: a third of the time)")
    args = parser.parse_args(argv)
    if args.judges < 1:
        parser.error(f"--judges must be 1 or more, got {args.judges}")

    def body(_argv) -> None:
        run = run_state.Run.open(args.run, read_only=True)
        config, vqvae = run.read_config(), run.load_vqvae()
        if not run.stage("prior").finished:
            raise UserError(f"{run.path} has no trained prior; `python train.py --resume {run.path} --stage prior`")
        prior = run.stage("prior").load_model(float32=True)
        data_dir = args.data_dir or config.data_dir
        validation = dataset.Split.load(data_dir, "validate", config.image_size)
        if validation.positions is None or not prior.num_conditions:
            raise UserError("sampling rules are compared at the validation slices' depths: this run's slice names "
                            "carry no depths, or its prior is not conditioned on them")
        train = dataset.Split.load(data_dir, "train", config.image_size)
        subjects, train_subjects = validation.subjects(), train.subjects()
        ideal = np.isin(train_subjects, np.unique(train_subjects)[:len(np.unique(subjects))])  # as many subjects
        reference = (train.images[ideal], train.positions[ideal])
        segmenter = run.stage("segmenter").load_model(float32=True) if run.stage("segmenter").finished else None

        def judged(images, positions, groups=None) -> dict:
            """C2ST against the validation slices (samples: each its own group; real slices: their subjects) and the
            tissue report against them, its floor the training subjects' slices."""
            c2st = realism.c2st(images, validation.images, groups=(groups, subjects), seed=args.seed,
                                judges=args.judges)
            result = {"accuracy": c2st["accuracy"], "ci95": c2st["ci95"]}
            if segmenter is not None:
                anatomy, _ = realism.tissue_report(segmenter, (images, positions), reference,
                                                   (validation.images, validation.positions), None,
                                                   verbose=False)
                result["tissue_x_floor"] = {key: times_floor(anatomy[key], anatomy["floor"][key])
                                            for key in TISSUE_ERRORS}
            return result

        print(f"run {run.path}: {len(subjects)} validation slices ({len(np.unique(subjects))} subjects) against "
              f"samples at their depths, and against the slices of as many training subjects (the ideal)")
        rows = {IDEAL: judged(*reference, train_subjects[ideal])}
        for temperature, guidance, top_k in itertools.product(args.temperatures, args.guidance, args.top_k):
            sample = predict.make_sampler(prior, temperature, args.seed, guidance, top_k)
            images = utils.batched(vqvae.decode, sample(len(subjects), validation.positions))
            rows[f"T {temperature}, guidance {guidance}, top-k {top_k}"] = judged(images, validation.positions)
        rules = [name for name in rows if name != IDEAL]
        chosen = min(rules, key=lambda name: rows[name]["accuracy"])
        print(f"{'':<36}{'C2ST accuracy':>26}   tissue fraction / map / shape x floor")
        for name, row in rows.items():
            tissue = " / ".join("-" if x is None else f"{x:.2f}" for x in row.get("tissue_x_floor", {}).values())
            mark = "  <- chosen" if name == chosen else ""
            print(f"{name:<36}{row['accuracy']:>8.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]   {tissue}{mark}")
        print(json.dumps({"benchmark": "sampling_rules", "run": str(run.path), "judges": args.judges, "rules": rows,
                          "chosen": chosen}))

    return utils.script_main(body, None)


if __name__ == "__main__":
    sys.exit(main())
