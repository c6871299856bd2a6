"""What more prior training buys: realism and tissue errors against the prior's training epochs, one point per
run. Each run is the same VQ-VAE with its prior trained for another number of epochs (`python train.py --resume
RUN --stage prior --retrain --prior-epochs N` on copies of one run), evaluated by `python predict.py --run RUN`;
this script only reads their metrics.json (no TensorFlow) and draws the curve.

    python -m benchmarks.prior_curve runs/e8 runs/base runs/e32 runs/e64 --out images/prior_curve.png

Per run: the prior's epochs, training minutes (as measured: read them as comparable only for runs trained alone on
one machine) and validation NLL, the realism test (C2ST accuracy with its 95% interval,
samples at validation depths, at training depths where measured, and real vs real), and the tissue report's three
errors as multiples of their real-vs-real floor (issue 25's target: at most 2x). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import utils
from utils import UserError

TISSUE_ERRORS = ("tissue_fraction_error", "tissue_map_error", "shape_error")
C2ST_SETS = {"samples_at_real_depths_vs_real": "samples at validation depths",  # predict.py's test
             "samples_vs_real": "samples, depths from training",  # runs evaluated before 2026-12-07, or diagnostics
             "real_vs_real": "real vs real"}


def point(run_path: str) -> dict:
    """One run's point of the curve, from its metrics.json (its prior trained, predict.py run with the realism
    test and the tissue report)."""
    path = Path(run_path) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass run folders that train.py made and predict.py "
                        "evaluated") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; run `python predict.py --run {run_path}` again") from None
    prior, samples = metrics.get("prior"), metrics.get("samples", {})
    if not prior or "c2st" not in samples or "anatomy" not in samples:
        raise UserError(f"{run_path} lacks a trained prior or predict.py's realism test and tissue report; run "
                        f"`python predict.py --run {run_path}` first")
    anatomy = samples["anatomy"]
    return {"run": run_path, "prior_epochs": prior["epochs"], "kept_epoch": prior["kept_epoch"],
            "prior_minutes": round(prior["train_seconds"] / 60, 2),
            "val_bits_per_code": round(prior["val_bits_per_code"], 4),
            "train_bits_per_code": round(prior["train_bits_per_code"], 4),
            "c2st": {key: {"accuracy": round(samples["c2st"][key]["accuracy"], 4),
                           "ci95": [round(x, 4) for x in samples["c2st"][key]["ci95"]]}
                     for key in C2ST_SETS if key in samples["c2st"]},
            "tissue_x_floor": {key: round(anatomy[key] / anatomy["floor"][key], 3) for key in TISSUE_ERRORS},
            "copy_check": {"samples": round(samples["nearest_train_ssim"]["samples"]["mean"], 4),
                           "real": round(samples["nearest_train_ssim"]["real"]["mean"], 4)}}


def draw(points: list[dict], path: Path) -> None:
    """Three panels against the prior's training epochs (log scale; time grows with them): C2ST accuracy with
    intervals, tissue errors x floor, validation NLL."""
    plt = utils._pyplot()
    epochs = [p["prior_epochs"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key, label in C2ST_SETS.items():
        judged = [p for p in points if key in p["c2st"]]
        if not judged:
            continue
        accuracy = np.array([p["c2st"][key]["accuracy"] for p in judged])
        low, high = (np.array([p["c2st"][key]["ci95"][i] for p in judged]) for i in (0, 1))
        axes[0].errorbar([p["prior_epochs"] for p in judged], accuracy, yerr=[accuracy - low, high - accuracy],
                         marker="o", capsize=3, label=label)
    axes[0].axhline(0.5, color="gray", linestyle="--", linewidth=1)
    axes[0].axhline(0.65, color="red", linestyle=":", linewidth=1, label="target (samples)")
    axes[0].set(ylabel="C2ST accuracy (0.5: indistinguishable)", title="realism test")
    for key in TISSUE_ERRORS:
        axes[1].plot(epochs, [p["tissue_x_floor"][key] for p in points], marker="o", label=key.replace("_", " "))
    axes[1].axhline(1, color="gray", linestyle="--", linewidth=1)
    axes[1].axhline(2, color="red", linestyle=":", linewidth=1, label="target")
    axes[1].set(ylabel="x real-vs-real floor", title="tissue report")
    axes[2].plot(epochs, [p["val_bits_per_code"] for p in points], marker="o", label="validation")
    axes[2].plot(epochs, [p["train_bits_per_code"] for p in points], marker="o", label="train")
    axes[2].set(ylabel="bits per code", title="prior NLL")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(epochs, [str(e) for e in epochs])
        ax.set_xlabel("prior training epochs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for p in points:
        axes[2].annotate(f"{p['prior_minutes']:.0f} min", (p["prior_epochs"], p["val_bits_per_code"]),
                         textcoords="offset points", xytext=(3, 4), fontsize=8)
    utils.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders, each evaluated by predict.py")
    parser.add_argument("--out", type=Path, help="the figure to write (PNG)")
    args = parser.parse_args(argv)

    def body(_argv) -> None:
        points = sorted((point(run) for run in args.runs), key=lambda p: p["prior_epochs"])
        print(f"{'run':<14}{'epochs':>7}{'minutes':>9}{'val NLL':>9}{'samples C2ST':>24}{'training depths':>24}"
              f"{'real vs real':>24}   tissue fraction/map/shape x floor")
        interval = lambda c: f"{c['accuracy']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]" if c else "-"
        for p in points:
            c, t = p["c2st"], p["tissue_x_floor"]
            print(f"{Path(p['run']).name:<14}{p['prior_epochs']:>7}{p['prior_minutes']:>9.1f}"
                  f"{p['val_bits_per_code']:>9.3f}" + "".join(f"{interval(c.get(key)):>24}" for key in C2ST_SETS)
                  + "   "
                  + " / ".join(f"{t[key]:.2f}" for key in TISSUE_ERRORS))
        if args.out:
            draw(points, args.out)
            print(f"figure: {args.out}")
        print(json.dumps({"benchmark": "prior_curve", "points": points}))

    return utils.script_main(body, None)


if __name__ == "__main__":
    sys.exit(main())
