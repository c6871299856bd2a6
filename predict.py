"""Evaluates a trained run and generates new brains from it.

    python predict.py                            # the newest run in runs/: reconstruction metrics + 16 samples
    python predict.py --run runs/NAME --num-samples 64 --temperature 0.9 --seed 1
    python predict.py --run runs/NAME --slice-position 0.3 0.5 0.7   # brains at these depths
    python predict.py --run runs/NAME --split validate --data-dir PATH
    python predict.py --run runs/NAME --realism-diagnostics       # also judge reconstructions and real layouts

Everything is rebuilt from the run folder alone (config.json, vqvae.keras, prior.keras). Writes, into the run:
    ssim_hist.png, recon_SPLIT.png     reconstruction SSIM per slice and a grid, beside the trivial floors
    samples.png, samples/*.png         generated slices (when the run has a prior)
    depths.png                         real and generated slices at the same depths (a depth-conditioned prior)
    metrics.json                       `reconstruction` and `samples` sections; the samples' headline is the
                                       realism test (C2ST accuracy: 0.5 means a CNN cannot tell them from real)
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads: none of its C++ log lines

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import utils

with utils.native_stderr_captured():  # TensorFlow's C++ start-up lines
    import tensorflow as tf
    import tensorflow_probability as tfp

import dataset
import modules
from utils import Run, UserError


def main(argv: list[str] | None = None) -> int:
    return utils.script_main(evaluate_and_generate, argv)


def evaluate_and_generate(argv: list[str] | None = None) -> None:
    """Reconstruction metrics of the run's VQ-VAE on a split; then, if the run has a prior, samples, their realism
    and the figures."""
    args = parse_args(argv)
    if args.num_samples <= 0:
        raise UserError(f"--num-samples must be a positive integer, got {args.num_samples}")
    if args.realism_samples < 0 or args.realism_draws < 0:
        raise UserError(f"--realism-samples and --realism-draws must be 0 or more, got {args.realism_samples} and "
                        f"{args.realism_draws}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 or more, got {args.temperature}")
    for position in args.slice_position or ():
        if not 0 <= position <= 1:
            raise UserError(f"--slice-position takes depths from 0 (the subject's first slice) to 1 (its last), "
                            f"got {position}")
    run = Run.open(args.run) if args.run else Run.newest(args.runs_dir)
    config = run.read_config()
    out = Run(args.out) if args.out else run  # where the figures, samples and metrics go
    check_writable(out.path, given=bool(args.out))  # before minutes of evaluation, not after
    print(f"run: {run.path}" + (f"; writing into {out.path}" if args.out else ""))
    vqvae = run.load_vqvae()
    data_dir = args.data_dir or config.data_dir
    split = Split.load(data_dir, args.split, config.image_size)
    codes = evaluate_reconstruction(out, config, vqvae, split, data_dir)
    if run.stage("prior").has_checkpoint:
        generate(run, out, config, vqvae, args, data_dir, split, codes)
    else:
        print(f"{run.path} has no prior yet, so no samples: `python train.py --resume {run.path} --stage prior`")


def check_writable(folder: Path, given: bool) -> None:
    """Makes the output folder if needed; a UserError unless files can be written into it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=f".write-check{utils.TEMP_MARK}")
        probe.close()
    except OSError as error:
        remedy = "pass another --out" if given else "pass --out DIR to write them elsewhere"
        raise UserError(f"cannot write the figures, samples and metrics into {folder} ({error.strerror}); "
                        f"{remedy}") from None


REALISM_DRAWS = 3  # one draw of 128 samples moved the C2ST by 0.1 to 0.2 with the seed (README, Generation)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run", help="run folder (default: the newest run under --runs-dir)")
    parser.add_argument("--runs-dir", default="runs", help="where to look for the newest run (default runs)")
    parser.add_argument("--data-dir", help="data to evaluate on (default: the run's own data_dir)")
    parser.add_argument("--split", choices=dataset.SPLITS, default="test", help="split to reconstruct (default test)")
    parser.add_argument("--num-samples", type=int, default=16, help="brains to generate into samples/ (default 16)")
    parser.add_argument("--slice-position", type=float, nargs="+", metavar="P",
                        help="depths to generate at, from 0 (a subject's first slice) to 1 (its last), used in turn; "
                             "default: drawn from the training slices' depths")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="divides the prior's logits; below 1 is more conservative, 0 takes the argmax")
    parser.add_argument("--seed", type=int, help="sampling seed (default: the run's seed); same seed, same samples")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="write figures, samples and metrics.json here instead of into the run folder")
    parser.add_argument("--realism-samples", type=int, default=128, metavar="N",
                        help="samples the realism test judges against as many real slices (default 128, or fewer "
                             "if the validation or test split is smaller; 0 skips the test)")
    parser.add_argument("--realism-draws", type=int, default=REALISM_DRAWS, metavar="R",
                        help=f"times the realism test draws new samples and new judges; its accuracy is over all "
                             f"of them (default {REALISM_DRAWS}: one draw moves by about 0.1 with the seed; 0 skips "
                             "the test)")
    parser.add_argument("--realism-diagnostics", action="store_true",
                        help="also judge the VQ-VAE's reconstructions of the real slices (what a perfect prior "
                             "would reach; measured once per VQ-VAE) and, with a two-level prior, codes drawn given "
                             "the real slices' own layouts (which level falls short): about 20 s more each")
    return parser.parse_args(argv)


@dataclasses.dataclass
class Split:
    """The images of one data split with their file names and slice positions (None without slice numbers)."""

    name: str
    files: list[str]
    images: np.ndarray
    positions: np.ndarray | None

    @classmethod
    def load(cls, data_dir: str, name: str, image_size: int) -> "Split":
        files = dataset.split_files(data_dir, name)
        return cls(name, files, dataset.load_images(files, image_size), dataset.slice_positions(files))

    def subjects(self) -> np.ndarray:
        """Each slice's subject; a slice of its own where the names carry no subject."""
        subjects = dataset.slice_subjects(self.files)
        return np.array([f"{self.name} {i}" for i in range(len(self.files))]) if subjects is None else subjects


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------------------------


def evaluate_reconstruction(out: Run, config: utils.Config, vqvae, split: Split, data_dir: str) -> np.ndarray:
    """Reconstruction metrics of the VQ-VAE beside its floors, written into `out`; returns the code grids."""
    images = split.images
    recon, codes = utils.reconstruct(vqvae, images)
    candidates = {"vqvae": recon, **utils.floor_images(images, config.downsample)}
    per_slice = {name: utils.ssim(images, output) for name, output in candidates.items()}
    results = {name: utils.reconstruction_scores(images, output, per_slice[name])
               for name, output in candidates.items()}

    print(f"reconstruction, {split.name} split of {data_dir}: {len(images)} slices at {config.image_size} px")
    print(f"{'':>14} {'SSIM mean':>10} {'median':>8} {'min':>8}  {'brain-crop SSIM':>15} {'PSNR dB':>8}")
    for name, r in results.items():
        print(f"{name:>14} {r['ssim']['mean']:>10.4f} {r['ssim']['median']:>8.4f} {r['ssim']['min']:>8.4f}  "
              f"{r['ssim_brain_crop']['mean']:>15.4f} {r['psnr']['mean']:>8.2f}")

    utils.plot_histogram(out.figure("ssim_hist"), per_slice, "SSIM per slice",
                         f"Reconstruction SSIM, {split.name} split ({len(images)} slices)")
    show = np.linspace(0, len(images) - 1, 8).astype(int)
    bilinear = utils.floor_name(config.downsample)
    utils.plot_image_rows(out.figure(f"recon_{split.name}"),
                          {f"{split.name} originals": images[show], "VQ-VAE reconstructions": recon[show],
                           f"{utils.floor_label(bilinear)} (floor)": candidates[bilinear][show]})
    out.update_metrics("reconstruction", {"split": split.name, "data_dir": str(data_dir),
                                          "num_images": len(images), **results})
    return codes


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def make_sampler(prior, temperature: float, seed: int):
    """sample(n, positions=None, seed=seed, stream=0, layouts=None) -> (n, H, W) int32 code grids, positions (n,)
    being the slices' depths for a conditioned prior, layouts (n, H/2, W/2) the layouts a two-level prior draws
    its codes from (VQVAE.layout of real slices, say) instead of sampling them. The whole autoregressive loop is
    one tf.function graph (traced once per n, whatever the seed); each position draws from tfp Categorical(logits /
    temperature) with a stateless seed derived from (seed, stream, position), so the same seed and stream give the
    same samples."""

    @tf.function
    def compiled(n, condition, base_seed, layouts):
        def draw(logits, position):
            if temperature == 0:
                return tf.argmax(logits, axis=-1, output_type=tf.int32)
            position_seed = tf.random.experimental.stateless_fold_in(base_seed, tf.cast(position, tf.int32))
            return tfp.distributions.Categorical(logits=logits / temperature).sample(seed=position_seed)

        return prior.sample(n, draw, condition, layouts)

    def sample(n: int, positions=None, seed: int = seed, stream: int = 0, layouts=None) -> np.ndarray:
        base_seed = tf.constant([seed, stream], tf.int32)  # another stream: other samples from the same seed
        layouts = None if layouts is None else tf.constant(np.asarray(layouts, "int32"))
        if not prior.num_conditions:
            return compiled(n, None, base_seed, layouts).numpy()
        features = modules.slice_position_features(np.asarray(positions, "float32"), prior.num_conditions // 2)
        return compiled(n, tf.constant(np.asarray(features)), base_seed, layouts).numpy()

    return sample


def generate(run: Run, out: Run, config: utils.Config, vqvae, args: argparse.Namespace, data_dir: str, split: Split,
             split_codes: np.ndarray) -> dict:
    """Samples brains from the prior of `run`, judges their realism against held-out slices, draws the figures;
    writes into `out` (the run folder, or --out)."""
    prior = run.stage("prior").load_model(float32=True)  # sampled in full precision
    if prior.num_embeddings != vqvae.num_embeddings:
        raise UserError(f"{run.stage('prior').checkpoint} predicts {prior.num_embeddings} codes but the VQ-VAE has "
                        f"{vqvae.num_embeddings}; retrain the prior with `python train.py --resume {run.path} "
                        "--stage prior --retrain`")
    conditioned = bool(prior.num_conditions)
    if args.slice_position and not conditioned:
        raise UserError(f"the prior of {run.path} is not conditioned on depth (its file names had no slice numbers, "
                        "or it was trained with --prior-position-frequencies 0); drop --slice-position")
    seed = config.seed if args.seed is None else args.seed
    sample = make_sampler(prior, args.temperature, seed)
    depths = Depths(run, seed) if conditioned else None

    def generated(n: int, positions=None, stream: int = 0, layouts=None) -> np.ndarray:
        return utils.batched(vqvae.decode, sample(n, positions, stream=stream, layouts=layouts))

    # 1. The samples asked for
    n = args.num_samples
    positions = (np.resize(np.asarray(args.slice_position, "float32"), n) if args.slice_position
                 else depths.draw(n) if conditioned else None)
    start = time.time()
    samples = generated(n, positions)
    seconds = time.time() - start
    where = f", at depths {', '.join(f'{p:.2f}' for p in args.slice_position)}" if args.slice_position else ""
    print(f"generated {n} brains ({config.grid_size}x{config.grid_size} codes, temperature {args.temperature}, "
          f"seed {seed}{where}) in {seconds:.1f} s, compilation included")
    out.write_samples(samples)
    captions = None if positions is None else [f"depth {p:.2f}" for p in positions]
    utils.plot_image_rows(out.figure("samples"),
                          {f"samples {r + 1}-{min(r + 8, n)}": samples[r:r + 8] for r in range(0, n, 8)},
                          title=f"PixelCNN samples, temperature {args.temperature}, seed {seed}",
                          captions=None if captions is None else {f"samples {r + 1}-{min(r + 8, n)}": captions[r:r + 8]
                                                                  for r in range(0, n, 8)})
    section = {"num_samples": n, "temperature": args.temperature, "seed": seed, "sampling_seconds": round(seconds, 2),
               "conditioned_on_depth": conditioned}

    # 2. Is a sample distinguishable from a real slice? The classifier two-sample test against the test split,
    # beside real validation slices (the ideal), over several draws of samples and of the judges: one draw moves
    # with the seed by about 0.1. --realism-diagnostics adds VQ-VAE reconstructions (what a perfect prior would
    # reach) and, with two levels, codes drawn given real layouts.
    held_out = {name: split if split.name == name else Split.load(data_dir, name, config.image_size)
                for name in ("validate", "test")}
    real, test = held_out["validate"], held_out["test"]
    n, draws = min(args.realism_samples, len(real.images), len(test.images)), args.realism_draws
    if n and draws:
        # The references (and the real side of the copy check) depend on the data, the VQ-VAE and the judge only:
        # measured once, then read from metrics.json.
        reference = {"n": n, "draws": draws, "seed": seed, "data_dir": str(data_dir),
                     "vqvae": checkpoint_stamp(run, "vqvae"),
                     "judge": {"channels": list(utils.JUDGE_CHANNELS), "folds": utils.C2ST_FOLDS,
                               "epochs": utils.C2ST_EPOCHS, "size": utils.C2ST_SIZE}}  # another judge: measure anew
        known, known_copy = previous_references(out, reference)
        picks = [np.random.default_rng([seed, r]).permutation(len(real.images))[:n] for r in range(draws)]
        subjects = real.subjects()
        real_images, real_subjects = [real.images[p] for p in picks], [subjects[p] for p in picks]

        def drawn(stream: int, positions=None, layouts=None) -> list[np.ndarray]:
            """Every draw's n samples from one sampler call (one batch of n x draws samples is faster than draws
            batches of n), split into the draws; positions and layouts: one array per draw, or None."""
            joined = generated(n * draws, None if positions is None else np.concatenate(positions), stream=stream,
                               layouts=None if layouts is None else np.concatenate(layouts))
            return np.split(joined, draws)

        samples = drawn(1, [depths.draw(n) for _ in range(draws)] if conditioned else None)
        judged = {"samples_vs_real": (samples, None)}  # independent draws: each its own group
        if "real_vs_real" not in known:  # a subject's slices share a fold (utils.c2st)
            judged["real_vs_real"] = (real_images, real_subjects)
        if args.realism_diagnostics and "reconstructions_vs_real" not in known:
            judged["reconstructions_vs_real"] = ([utils.reconstruct(vqvae, images)[0] for images in real_images],
                                                 real_subjects)
        real_depths = [real.positions[p] for p in picks] if conditioned and real.positions is not None else None
        if real_depths is not None:
            judged["samples_at_real_depths_vs_real"] = (drawn(2, real_depths), None)
        if args.realism_diagnostics and prior.layout_levels:  # which level falls short: codes given real layouts
            layouts = [utils.code_layouts(vqvae, utils.batched(vqvae.encode, images), prior.layout_levels)
                       for images in real_images]
            judged["samples_given_real_layouts_vs_real"] = (drawn(3, real_depths, layouts), None)
        section["c2st"] = realism(judged, test, seed, known)
        section["c2st_reference"] = reference
        section["nearest_train_ssim"] = copy_check(samples[0], real_images[0], config, data_dir, known_copy)
        section["brain_fraction"] = {"samples": utils.summarize(utils.brain_fraction(np.concatenate(samples))),
                                     "real": utils.summarize(utils.brain_fraction(np.concatenate(real_images)))}

    # 3. Real and generated slices at the same depths
    if conditioned and test.positions is not None:
        depth_figure(out.figure("depths"), test, generated)

    # 4. The prior's likelihood of the evaluated split
    split_conditions = (None if not conditioned else
                        np.asarray(modules.slice_position_features(split.positions, prior.num_conditions // 2)))
    layouts = utils.code_layouts(vqvae, split_codes, prior.layout_levels) if prior.layout_levels else None
    section["prior_bits_per_code"] = {"split": split.name,
                                      "value": utils.bits_per_code(prior, split_codes, split_conditions, layouts),
                                      "uniform": float(np.log2(config.num_embeddings))}
    print(f"prior NLL on the {split.name} split: {section['prior_bits_per_code']['value']:.3f} bits/code "
          f"(a uniform prior: {section['prior_bits_per_code']['uniform']:.1f})")
    out.update_metrics("samples", section)
    return section


class Depths:
    """Where unconditioned requests draw their depths from: the training slices' positions, kept with the run."""

    def __init__(self, run: Run, seed: int):
        cached = run.read_codes("train")
        if cached is None or cached[1] is None:
            raise UserError(f"{run.path} has no slice positions of its training split (they are cached with its "
                            f"code grids); retrain the prior: `python train.py --resume {run.path} --stage prior "
                            "--retrain`")
        self.positions, self.rng = cached[1], np.random.default_rng([seed, 1])

    def draw(self, n: int) -> np.ndarray:
        return self.rng.choice(self.positions, n)


def realism(judged: dict, test: Split, seed: int, known: dict) -> dict:
    """C2ST accuracy of each (draws of images, their subject ids or None) set against the real test slices, beside
    the `known` results measured before, printed as a table."""
    labels = {"real_vs_real": "real validation slices (the ideal)",
              "reconstructions_vs_real": "VQ-VAE reconstructions (a perfect prior's)",
              "samples_vs_real": "samples, depths drawn from training",
              "samples_at_real_depths_vs_real": "samples at the validation depths",
              "samples_given_real_layouts_vs_real": "samples given validation layouts, depths"}
    size = min(utils.C2ST_SIZE, test.images.shape[1])
    print(f"realism: can a small CNN tell these from real test slices? (classifier two-sample test, "
          f"{utils.C2ST_FOLDS}-fold, at {size} px; 0.5 = indistinguishable, 1.0 = always told apart)")
    results, test_subjects = dict(known), test.subjects()
    for name, (draws, subjects) in judged.items():
        results[name] = utils.c2st(draws, test.images, groups=(subjects, test_subjects), seed=seed)
    for name in labels:
        if name in results:
            result = results[name]
            low, high = result["ci95"]
            each = f"draws {' '.join(f'{a:.2f}' for a in result['draws'])}; " if len(result["draws"]) > 1 else ""
            print(f"{labels[name]:>46}  accuracy {result['accuracy']:.3f}  [{low:.3f}, {high:.3f}]  ({each}"
                  f"{result['n_per_set']} per set{', measured before' if name in known else ''})")
    return results


def checkpoint_stamp(run: Run, stage: str) -> list[int]:
    """Size and modification time of a stage's checkpoint: a retrained stage has another."""
    status = run.stage(stage).checkpoint.stat()
    return [status.st_size, status.st_mtime_ns]


def previous_references(out: Run, reference: dict) -> tuple[dict, dict | None]:
    """What an earlier predict.py on the same data, VQ-VAE, n and seed measured that does not depend on the prior:
    the real-vs-real and reconstruction C2STs, and the real slices' side of the copy check (None if not there)."""
    try:
        previous = out.read_metrics().get("samples", {})
    except UserError:  # a damaged metrics.json: measure again (update_metrics keeps the damaged one aside)
        return {}, None
    if previous.get("c2st_reference") != reference:
        return {}, None
    known = {name: previous["c2st"][name] for name in ("real_vs_real", "reconstructions_vs_real")
             if name in previous.get("c2st", {})}
    return known, previous.get("nearest_train_ssim", {}).get("real")


def copy_check(samples: np.ndarray, real: np.ndarray, config: utils.Config, data_dir: str,
               known_real: dict | None = None) -> dict:
    """Nearest-training-slice SSIM of samples and of real held-out slices (`known_real` if measured before):
    samples are copies if theirs is higher."""
    train_images = dataset.load_images(dataset.split_files(data_dir, "train"), config.image_size)
    result = {"samples": utils.summarize(utils.nearest_ssim(samples, train_images)),
              "real": known_real or utils.summarize(utils.nearest_ssim(real, train_images))}
    verdict = "not copies" if result["samples"]["mean"] < result["real"]["mean"] else "closer to training slices " \
        "than real held-out slices are: possibly copies"
    print(f"copy check, mean SSIM to the nearest training slice: samples {result['samples']['mean']:.3f}, real "
          f"held-out slices {result['real']['mean']:.3f} ({verdict})")
    return result


def depth_figure(path, test: Split, generated, columns: int = 8, rows: int = 3) -> None:
    """Slices of the first test subject at `columns` depths, and `rows` samples generated at each of those depths."""
    subject = dataset.SLICE_NAME.match(Path(test.files[0]).name)["subject"]
    mine = np.flatnonzero([Path(f).name.startswith(subject + "_slice_") for f in test.files])
    mine = mine[np.argsort(test.positions[mine])]
    pick = mine[np.linspace(0, len(mine) - 1, columns).round().astype(int)]
    depths = test.positions[pick]
    samples = generated(columns * rows, np.tile(depths, rows))
    figure_rows = {f"real: test subject {subject}": test.images[pick]}
    figure_rows.update({f"generated at the same depths ({r + 1})": samples[r * columns:(r + 1) * columns]
                        for r in range(rows)})
    utils.plot_image_rows(path, figure_rows, title="Real and generated slices at the same depths",
                          captions={f"real: test subject {subject}": [f"depth {d:.2f}" for d in depths]})


if __name__ == "__main__":
    sys.exit(main())
