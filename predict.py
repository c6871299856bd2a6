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
    anatomy.png                        the tissue report: where CSF, gray and white matter lie and what shape they
                                       take in samples and in real slices, per depth band (a run with a segmenter)
    metrics.json                       `reconstruction` and `samples` sections; the samples' headline is the
                                       realism test (C2ST accuracy: 0.5 means a CNN cannot tell them from real)
                                       and their tissue report (samples.anatomy: errors beside real-vs-real's)
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads: none of its C++ log lines

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import utils

with utils.native_stderr_captured():  # TensorFlow's C++ start-up lines, where Keras runs on TensorFlow
    import keras

import dataset
import modules
import realism
import run_state
from run_state import Run
from utils import UserError


def main(argv: list[str] | None = None) -> int:
    return utils.script_main(evaluate_and_generate, argv)


def evaluate_and_generate(argv: list[str] | None = None) -> None:
    """Reconstruction metrics of the run's VQ-VAE on a split; then, if the run has a prior, samples, their realism
    and the figures."""
    args = parse_args(argv)
    if args.num_samples <= 0:
        raise UserError(f"--num-samples must be a positive integer, got {args.num_samples}")
    if (args.realism_samples or 0) < 0 or args.realism_draws < 0:
        raise UserError(f"--realism-samples and --realism-draws must be 0 or more, got {args.realism_samples} and "
                        f"{args.realism_draws}")
    if args.realism_judges < 1:
        raise UserError(f"--realism-judges must be 1 or more, got {args.realism_judges}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 or more, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be 0 (all codes) or more, got {args.top_k}")
    if args.guidance < 0:
        raise UserError(f"--guidance must be 0 or more (1: none), got {args.guidance}")
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
    split = dataset.Split.load(data_dir, args.split, config.image_size)
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
    parser.add_argument("--guidance", type=float, default=1.0, metavar="S",
                        help="classifier-free guidance on depth: logits_u + S (logits_c - logits_u); 1 (default) is "
                             "the prior as trained, above 1 weighs the depth more (a prior trained with "
                             "--prior-condition-dropout); sampling costs twice as much")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="draw each code among the K most likely only (0, the default: among all); on the demo "
                             "it did not make samples more real (benchmarks/sampling_rules.py compares K on validation)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: the run's seed); same seed, same samples")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="write figures, samples and metrics.json here instead of into the run folder")
    parser.add_argument("--realism-samples", type=int, metavar="N",
                        help="samples the realism test judges against as many real slices (default: as many as the "
                             "smaller of the validation and test splits holds, all of them; 0 skips the test)")
    parser.add_argument("--realism-draws", type=int, default=realism.DRAWS, metavar="R",
                        help=f"times the realism test draws new samples and new judges; its accuracy is over all "
                             f"of them (default {realism.DRAWS}: a draw of every real slice moves little with the "
                             "seed; more draws for fewer --realism-samples; 0 skips the test)")
    parser.add_argument("--realism-judges", type=int, default=realism.C2ST_JUDGES, metavar="J",
                        help=f"judges a fold, each drawn with its own seed, whose mean evidence is the fold's verdict "
                             f"(default {realism.C2ST_JUDGES}: one judge's accuracy moves by up to 0.2 with its seed, "
                             "three judges' by about half that); 1 is about three times faster, for a quick look")
    parser.add_argument("--no-realism", action="store_true",
                        help="skip the realism test and the tissue report (samples and figures only)")
    parser.add_argument("--realism-diagnostics", action="store_true",
                        help="also judge samples at depths drawn from training (not only at the real slices' "
                             "depths), the VQ-VAE's reconstructions of the real slices (what a perfect prior "
                             "would reach; measured once per VQ-VAE) and, with a two-level prior, codes drawn given "
                             "the real slices' own layouts (which level falls short): about a minute more each")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------------------------


def evaluate_reconstruction(out: Run, config: run_state.Config, vqvae, split: dataset.Split,
                            data_dir: str) -> np.ndarray:
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


def make_sampler(prior, temperature: float, seed: int, guidance: float = 1.0, top_k: int = 0):
    """sample(n, positions=None, seed=seed, stream=0, layouts=None) -> (n, H, W) int32 code grids, positions (n,)
    being the slices' depths for a conditioned prior, layouts (n, H/2, W/2) the layouts a two-level prior draws
    its codes from (VQVAE.layout of real slices, say) instead of sampling them. The whole autoregressive loop is
    one compiled graph (tf.function, or jax.jit under JAX; traced once per n, whatever the seed); each position
    draws from Categorical(logits / temperature) (the argmax at 0) with a seed derived from (seed, stream,
    position), so the same seed and stream give the same samples. guidance != 1 samples with classifier-free
    guidance at that scale (modules.guided_draw; a prior trained with condition_dropout), at twice the cost; top_k
    > 0 draws among the k most likely codes only (modules.top_k_draw)."""
    guided = guidance != 1.0
    if guided and not prior.condition_dropout:
        raise UserError("--guidance needs a prior trained with --prior-condition-dropout above 0 (it must also know "
                        "the slices without their depth); retrain the prior with it, or drop --guidance")
    compiled = (_compiled_tensorflow if keras.backend.backend() != "jax" else _compiled_jax)(
        prior, temperature, guidance, top_k)

    def sample(n: int, positions=None, seed: int = seed, stream: int = 0, layouts=None) -> np.ndarray:
        layouts = None if layouts is None else np.asarray(layouts, "int32")
        condition = None if not prior.num_conditions else np.asarray(
            modules.slice_position_features(np.asarray(positions, "float32"), prior.num_conditions // 2))
        if guided:  # the same grids twice: with their depths, then without (zero conditions), tied by the draw rule
            condition = np.concatenate([condition, np.zeros_like(condition)])
            layouts = None if layouts is None else np.concatenate([layouts, layouts])
        codes = compiled(n * (1 + guided), condition, (seed, stream), layouts)  # another stream: other samples
        return codes[:n]

    return sample


def sampling_rule(draw, guidance: float, top_k: int):
    """A backend's draw rule, among the top_k most likely codes (modules.top_k_draw; 0: all) of the logits that
    classifier-free guidance makes (modules.guided_draw; 1: none)."""
    draw = modules.top_k_draw(draw, top_k) if top_k else draw
    return draw if guidance == 1.0 else modules.guided_draw(draw, guidance)


def _compiled_tensorflow(prior, temperature: float, guidance: float = 1.0, top_k: int = 0):
    """compiled(n, condition, (seed, stream), layouts) -> codes, through one tf.function; draws by tfp."""
    import tensorflow as tf
    import tensorflow_probability as tfp

    @tf.function
    def compiled(n, condition, base_seed, layouts):
        def draw(logits, position):
            if temperature == 0:
                return tf.argmax(logits, axis=-1, output_type=tf.int32)
            position_seed = tf.random.experimental.stateless_fold_in(base_seed, tf.cast(position, tf.int32))
            return tfp.distributions.Categorical(logits=logits / temperature).sample(seed=position_seed)

        return prior.sample(n, sampling_rule(draw, guidance, top_k), condition, layouts)

    return lambda n, condition, seeds, layouts: compiled(
        n, None if condition is None else tf.constant(condition), tf.constant(seeds, tf.int32),
        None if layouts is None else tf.constant(layouts)).numpy()


def _compiled_jax(prior, temperature: float, guidance: float = 1.0, top_k: int = 0):
    """compiled(n, condition, (seed, stream), layouts) -> codes, through one jax.jit; the weights enter it as
    arguments, not as constants baked into the compiled function."""
    import jax

    def sample(n, values, condition, key, layouts):
        def draw(logits, position):
            if temperature == 0:
                return keras.ops.argmax(logits, axis=-1)
            return jax.random.categorical(jax.random.fold_in(key, position), logits / temperature)

        with keras.StatelessScope(state_mapping=list(zip(prior.variables, values))):
            return prior.sample(n, sampling_rule(draw, guidance, top_k), condition, layouts)

    compiled = jax.jit(sample, static_argnums=0)
    values = [v.value for v in prior.variables]
    return lambda n, condition, seeds, layouts: np.asarray(compiled(
        n, values, condition, jax.random.fold_in(jax.random.key(seeds[0]), seeds[1]), layouts))


def generate(run: Run, out: Run, config: run_state.Config, vqvae, args: argparse.Namespace, data_dir: str,
             split: dataset.Split, split_codes: np.ndarray) -> dict:
    """Samples brains from the prior of `run`, judges their realism against held-out slices, draws the figures;
    writes into `out` (the run folder, or --out)."""
    prior = load_prior(run, vqvae, args)
    seed = config.seed if args.seed is None else args.seed
    sample = make_sampler(prior, args.temperature, seed, args.guidance, args.top_k)
    depths = Depths(run, seed) if prior.num_conditions else None

    def generated(n: int, positions=None, stream: int = 0, layouts=None) -> np.ndarray:
        return utils.batched(vqvae.decode, sample(n, positions, stream=stream, layouts=layouts))

    section = samples_asked_for(out, generated, depths, args, config, seed)
    held_out = {name: split if split.name == name else dataset.Split.load(data_dir, name, config.image_size)
                for name in ("validate", "test")}
    section.update(judged(run, out, config, vqvae, prior, generated, depths, held_out, args, data_dir, seed))
    if depths is not None and held_out["test"].positions is not None:
        depth_figure(out.figure("depths"), held_out["test"], generated)
    section["prior_bits_per_code"] = likelihood(prior, vqvae, split, split_codes, config)
    out.update_metrics("samples", section)
    return section


def load_prior(run: Run, vqvae, args: argparse.Namespace):
    """The run's prior in full precision (as it is sampled), checked against the VQ-VAE and the flags."""
    prior = run.stage("prior").load_model(float32=True)
    if prior.num_embeddings != vqvae.num_embeddings:
        raise UserError(f"{run.stage('prior').checkpoint} predicts {prior.num_embeddings} codes but the VQ-VAE has "
                        f"{vqvae.num_embeddings}; retrain the prior with `python train.py --resume {run.path} "
                        "--stage prior --retrain`")
    if args.slice_position and not prior.num_conditions:
        raise UserError(f"the prior of {run.path} is not conditioned on depth (its file names had no slice numbers, "
                        "or it was trained with --prior-position-frequencies 0); drop --slice-position")
    return prior


def samples_asked_for(out: Run, generated, depths, args: argparse.Namespace, config: run_state.Config,
                      seed: int) -> dict:
    """Generates --num-samples brains (at --slice-position, or at depths drawn from training), writes them and
    samples.png; returns the start of the metrics' `samples` section."""
    n = args.num_samples
    positions = (np.resize(np.asarray(args.slice_position, "float32"), n) if args.slice_position
                 else None if depths is None else depths.draw(n))
    start = time.time()
    samples = generated(n, positions)
    seconds = time.time() - start
    where = f", at depths {', '.join(f'{p:.2f}' for p in args.slice_position)}" if args.slice_position else ""
    guided = (f", guidance {args.guidance}" if args.guidance != 1.0 else "") + (
        f", top-k {args.top_k}" if args.top_k else "")
    print(f"generated {n} brains ({config.grid_size}x{config.grid_size} codes, temperature {args.temperature}"
          f"{guided}, seed {seed}{where}) in {seconds:.1f} s, compilation included")
    out.write_samples(samples)
    rows = {f"samples {r + 1}-{min(r + 8, n)}": slice(r, r + 8) for r in range(0, n, 8)}
    utils.plot_image_rows(out.figure("samples"), {label: samples[rows[label]] for label in rows},
                          title=f"PixelCNN samples, temperature {args.temperature}, seed {seed}",
                          captions=None if positions is None else {
                              label: [f"depth {p:.2f}" for p in positions[rows[label]]] for label in rows})
    return {"num_samples": n, "temperature": args.temperature, "guidance": args.guidance, "top_k": args.top_k,
            "seed": seed,
            "sampling_seconds": round(seconds, 2),
            "conditioned_on_depth": depths is not None}


def judged(run: Run, out: Run, config: run_state.Config, vqvae, prior, generated, depths, held_out: dict,
           args: argparse.Namespace, data_dir: str, seed: int) -> dict:
    """The realism test (realism.judge_samples) with the copy check and brain areas: the metrics' part on whether
    samples pass for real slices. The references that depend on the data, the VQ-VAE and the judge only are
    measured once, then read from metrics.json."""
    real, test = held_out["validate"], held_out["test"]
    every = min(len(real.images), len(test.images))
    n = every if args.realism_samples is None else min(args.realism_samples, every)
    draws = args.realism_draws
    if args.no_realism or not (n and draws):
        return {}
    stamp = run.stage("vqvae").checkpoint.stat()  # a retrained VQ-VAE has another size or time
    train_files = dataset.split_files(data_dir, "train")
    reference = realism.reference(n, draws, seed, data_dir, [stamp.st_size, stamp.st_mtime_ns],
                                  realism.data_stamp([real.images, test.images], train_files), args.realism_judges)
    try:
        previous = out.read_metrics().get("samples", {})
    except UserError:  # a damaged metrics.json: measure again (update_metrics keeps the damaged one aside)
        previous = {}
    known, known_copy = realism.previous_references(previous, reference)
    results, real_images, samples, at_depths = realism.judge_samples(
        generated, real, test, n, draws, seed, known, depths, vqvae, prior.layout_levels, args.realism_diagnostics,
        args.realism_judges)
    train_images = dataset.load_images(train_files, config.image_size)
    every_sample, every_real = np.concatenate(samples), np.concatenate(real_images)
    section = {"c2st": results, "c2st_reference": reference,
               "nearest_train_ssim": realism.copy_check(samples[0], real_images[0], train_images, known_copy),
               "brain_fraction": {"samples": utils.summarize(utils.brain_fraction(every_sample)),
                                  "real": utils.summarize(utils.brain_fraction(every_real))}}
    anatomy = tissue_report(run, out, at_depths, np.concatenate(real_images), test)
    if anatomy:
        section["anatomy"] = anatomy
    return section


def tissue_report(run: Run, out: Run, at_depths: tuple | None, real_images: np.ndarray, test: dataset.Split) -> dict:
    """realism.tissue_report of the samples drawn at the depths of the validation slices `real_images` (the realism
    test's, all draws), and anatomy.png; {} (with a line saying why) without a segmenter or without depths."""
    if not run.stage("segmenter").finished:
        print(f"no tissue report: {run.path} has no tissue segmenter (`python train.py --resume {run.path} --stage "
              "segmenter`, where the data has keras_png_slices_seg_* folders)")
        return {}
    if at_depths is None or test.positions is None:
        print("no tissue report: the slices' names carry no depths to compare them by")
        return {}
    segmenter = run.stage("segmenter").load_model(float32=True)
    section, stats = realism.tissue_report(segmenter, at_depths, (real_images, at_depths[1]),
                                           (test.images, test.positions), test.tissue())
    utils.plot_anatomy(out.figure("anatomy"), stats, at_depths, realism.TISSUES, realism.BANDS)
    return section


def likelihood(prior, vqvae, split: dataset.Split, split_codes: np.ndarray, config: run_state.Config) -> dict:
    """The prior's NLL of the evaluated split's code grids, in bits per code, beside a uniform prior's."""
    conditions = (None if not prior.num_conditions else
                  np.asarray(modules.slice_position_features(split.positions, prior.num_conditions // 2)))
    layouts = utils.code_layouts(vqvae, split_codes, prior.layout_levels) if prior.layout_levels else None
    result = {"split": split.name, "value": utils.bits_per_code(prior, split_codes, conditions, layouts),
              "uniform": float(np.log2(config.num_embeddings))}
    print(f"prior NLL on the {split.name} split: {result['value']:.3f} bits/code (a uniform prior: "
          f"{result['uniform']:.1f})")
    return result


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


def depth_figure(path, test: dataset.Split, generated, columns: int = 8, rows: int = 3) -> None:
    """Slices of the first test subject at `columns` depths, and `rows` samples generated at each of those depths."""
    subject, pick = test.subject_at_depths(columns)
    depths = test.positions[pick]
    samples = generated(columns * rows, np.tile(depths, rows))
    figure_rows = {f"real: test subject {subject}": test.images[pick]}
    figure_rows.update({f"generated at the same depths ({r + 1})": samples[r * columns:(r + 1) * columns]
                        for r in range(rows)})
    utils.plot_image_rows(path, figure_rows, title="Real and generated slices at the same depths",
                          captions={f"real: test subject {subject}": [f"depth {d:.2f}" for d in depths]})


if __name__ == "__main__":
    sys.exit(main())
