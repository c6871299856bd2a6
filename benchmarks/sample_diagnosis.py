"""Where do the samples lose their anatomy? One figure of a run, three questions (issue 25's diagnosis):

- do the codes carry ventricles and the cortical ribbon? (the VQ-VAE's reconstructions of a test subject)
- does the prior know the layout? (greedy samples, T = 0) Is it sampling entropy? (T = 0.7 and 1)
- with a two-level prior: is it the layout or the codes? (codes drawn at T = 1 given the test slices' own layouts)
- is the anatomy in each code's distribution, or lost as the sampler goes on? (teacher forcing: every code drawn at
  T = 1 given the true codes before it, in one pass: if these keep the ventricles that free sampling loses, the
  prior cannot hold the anatomy over its own draws)

    python -m benchmarks.sample_diagnosis --run runs/base --out /tmp/diagnosis

Rows: a test subject at 8 depths, its reconstructions, then samples at the same depths. Writes DIR/diagnosis.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import keras
import numpy as np

import dataset
import predict
import run_state
import train
import utils


def teacher_forced(prior, vqvae, codes, positions, temperature: float, seed: int) -> np.ndarray:
    """(N, H, W) code grids of slices at depths `positions` -> each code drawn again at `temperature` (the argmax
    at 0) from the prior's logits given the true codes before it (and the true layout and depth), all at once."""
    inputs, _ = train.prior_inputs(prior, np.asarray(codes), np.asarray(positions, "float32"), vqvae)
    logits = prior(inputs)
    logits = np.asarray(logits["codes"] if prior.layout_levels else logits)  # (N, H, W, K)
    if not temperature:
        return logits.argmax(-1).astype("int32")
    flat = logits.reshape(-1, logits.shape[-1]) / temperature
    drawn = keras.random.categorical(flat, 1, seed=seed)
    return np.asarray(drawn).reshape(codes.shape).astype("int32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7, 1.0])
    args = parser.parse_args(argv)
    run = run_state.Run.open(args.run, read_only=True)
    config, vqvae = run.read_config(), run.load_vqvae()
    prior = run.stage("prior").load_model(float32=True)
    test = dataset.Split.load(config.data_dir, "test", config.image_size)
    subject, pick = test.subject_at_depths(8)
    real, depths = test.images[pick], test.positions[pick]
    reconstructions, codes = utils.reconstruct(vqvae, real)
    rows = {f"real: test {subject}": real, "reconstructed": reconstructions}
    for temperature in args.temperatures:
        sample = predict.make_sampler(prior, temperature, args.seed)
        rows[f"T={temperature}"] = utils.batched(vqvae.decode, sample(8, depths))
        if temperature:
            rows[f"T={temperature} (2)"] = utils.batched(vqvae.decode, sample(8, depths, stream=1))
    if prior.layout_levels:
        layouts = utils.code_layouts(vqvae, codes, prior.layout_levels)
        sample = predict.make_sampler(prior, 1.0, args.seed)
        rows["T=1 given the real layouts"] = utils.batched(vqvae.decode, sample(8, depths, layouts=layouts))
    rows["T=1, each code given the true codes before it"] = utils.batched(
        vqvae.decode, teacher_forced(prior, vqvae, codes, depths, 1.0, args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    utils.plot_image_rows(args.out / "diagnosis.png", rows, title=f"{args.run}: where the anatomy is lost",
                          captions={f"real: test {subject}": [f"depth {d:.2f}" for d in depths]})
    print(f"wrote {args.out / 'diagnosis.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
