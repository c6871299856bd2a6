"""The benchmarks the README quotes still run: each in its quickest form, in its own process, as a user would start
it. (Two of them broke unseen when the prior became depth-conditioned; the figures are not checked here.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def benchmark(name: str, *args: str, backend: str = "tensorflow", expect_json: bool = True) -> dict | None:
    """Runs `python -m benchmarks.NAME` and returns its last line, the JSON figures (expect_json: else None)."""
    env = {**os.environ, "KERAS_BACKEND": backend}
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    if not expect_json:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_jax_benchmark_trains_and_samples_the_conditioned_prior_exactly():
    figures = benchmark("jax_train_step", "--demo", "--batch", "4", "--prior-batch", "4", "--steps", "1",
                        "--rounds", "1", "--samples", "2", backend="jax")
    assert figures["backend"] == "jax" and figures["vqvae_images_per_s"] > 0 and figures["prior_grids_per_s"] > 0
    assert figures["sampler_matches_full_model"] is True


@pytest.mark.slow
def test_the_sampling_benchmark_times_both_samplers():
    figures = benchmark("sampling", "--batch", "2", "--naive-rows", "1")
    assert figures["grid"] == [32, 32] and figures["sampler_s"] > 0 and figures["naive_positions_timed"] == 32


@pytest.mark.slow
def test_the_prior_step_benchmark_times_one_and_two_levels_at_two_sizes():
    figures = benchmark("prior_step", "--levels", "4", "0", "--dtypes", "float32", "--sizes", "8x2", "16x1",
                        "--batch", "2", "--steps", "1", "--rounds", "1")
    assert list(figures["ms_per_step"]) == [f"{size}, {levels} levels, float32" for size in ("8x2", "16x1")
                                            for levels in (4, 0)]
    assert all(ms > 0 for ms in figures["ms_per_step"].values()) and figures["grid"] == [32, 32]


@pytest.mark.slow
def test_the_realism_check_reports_every_known_answer_with_its_interval_and_p_value(demo_dir):
    figures = benchmark("realism_check", "--data-dir", str(demo_dir), "--image-size", "32", "--judges", "1",
                        "--deals", "2")
    assert figures["judges"] == 1  # one judge a fold: the known answers, not the ensemble, are under test here
    known = {"real", "real_val_vs_test", "bilinear", "smoothed", "interior_shuffled", "pixels_shuffled", "blank",
             "blob"}
    assert set(figures["known"]) == set(figures["ci95"]) == set(figures["p_value"]) == known
    assert figures["n_per_set"] == 32  # the tiny demo set's one validation and one test subject
    assert len(figures["real_deals"]) == 2  # real vs real: its two subjects dealt into halves twice
    for key in known:
        low, high = figures["ci95"][key]
        assert 0 <= low <= figures["known"][key] <= high <= 1 and 0 <= figures["p_value"][key] <= 1
    assert figures["known"]["blank"] >= 0.9 and figures["p_value"]["blank"] < 1e-6  # obviously wrong: told apart


def test_the_realism_checks_deals_keep_each_subject_whole_on_one_side_and_differ():
    import numpy as np

    from benchmarks.realism_check import dealt_halves

    subjects = np.repeat(np.array(["a", "b", "c", "d", "e"]), 3)
    images = np.arange(15)[:, None]
    firsts, seconds, (first_ids, second_ids) = dealt_halves(images, subjects, 6, np.random.default_rng(0))
    for first, second, ids, other_ids in zip(firsts, seconds, first_ids, second_ids):
        assert len(set(ids)) == 2 and set(ids).isdisjoint(other_ids) and set(ids) | set(other_ids) == set(subjects)
        assert sorted(np.concatenate([first, second])[:, 0]) == list(range(15))  # every slice once
        assert set(subjects[first[:, 0]]) == set(ids) and len(first) == 6  # a subject's 3 slices go with it
    assert len({tuple(sorted(set(ids))) for ids in first_ids}) > 1  # the deals differ


@pytest.mark.parametrize("name, args", [("realism_check", []), ("sampling_rules", ["--run", "runs/none"])])
def test_a_judge_count_below_one_is_one_line_and_exit_2(name, args):
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args, "--judges", "0"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and "--judges must be 1 or more, got 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_realism_check_refuses_fewer_than_one_deal_of_real_subjects_in_one_line():
    done = subprocess.run([sys.executable, "-m", "benchmarks.realism_check", "--deals", "0"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and "--deals must be 1 or more, got 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_oasis_budget_prior_sees_every_grid_moved_by_minus_s_0_or_plus_s_codes_with_its_depth_and_layout():
    from benchmarks.oasis_budget import ShiftedGrids
    import numpy as np

    import modules

    rng = np.random.default_rng(0)
    codes = np.zeros((12, 8, 8), "int32")  # code 0 is the empty frame, as the corner code of real grids is
    codes[:, 2:6, 2:6] = rng.integers(1, 16, (12, 4, 4))
    layouts = np.zeros((12, 4, 4), "int32")
    layouts[:, 1:3, 1:3] = rng.integers(1, 4, (12, 2, 2))
    features = np.arange(12, dtype="float32")[:, None] * np.ones((1, 3), "float32")
    prior = modules.PixelCNNPrior(16, (8, 8), 4, 1, 3, num_conditions=3, layout_levels=4)
    batches = ShiftedGrids(prior, codes, features, shift=2, batch_size=4, seed=0, layouts=layouts)
    assert len(batches) == 2  # an epoch: as many grids as the unmirrored half
    moves = set()
    for _ in range(5):
        for index in range(len(batches)):
            (grids, conditions, cells), targets = batches[index]
            assert (grids == targets["codes"]).all() and (cells == targets["layout"]).all()
            assert grids.shape[1:] == (8, 8) and cells.shape[1:] == (4, 4)
            for grid, condition, cell in zip(grids, conditions, cells):
                source = int(condition[0])  # the depth features say which grid it came from
                found = [(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2)
                         if (np.pad(codes[source], 2)[2 - dy:10 - dy, 2 - dx:10 - dx] == grid).all()]
                assert found, "a grid is not its source moved by -2, 0 or +2 codes"
                dy, dx = found[0]  # its layout moves with it, by half as many cells
                assert (np.pad(layouts[source], 1)[1 - dy // 2:5 - dy // 2, 1 - dx // 2:5 - dx // 2] == cell).all()
                moves.update(found)
        batches.on_epoch_end()
    assert len(moves) == 9  # every move occurs


def fake_evaluated_run(folder: Path, epochs: int, seconds: float, accuracy: float, shape_error: float,
                       judged=("samples_vs_real", "samples_at_real_depths_vs_real", "real_vs_real")) -> Path:
    """A run folder holding only the metrics.json sections prior_curve reads."""
    c2st = {key: {"accuracy": accuracy, "ci95": [accuracy - 0.05, accuracy + 0.05]} for key in judged}
    anatomy = {"tissue_fraction_error": 0.02, "tissue_map_error": 0.09, "shape_error": shape_error,
               "floor": {"tissue_fraction_error": 0.01, "tissue_map_error": 0.09, "shape_error": 0.1}}
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({
        "prior": {"epochs": epochs, "kept_epoch": epochs, "train_seconds": seconds, "val_bits_per_code": 3.0,
                  "train_bits_per_code": 2.5},
        "samples": {"c2st": c2st, "anatomy": anatomy,
                    "nearest_train_ssim": {"samples": {"mean": 0.6}, "real": {"mean": 0.62}}}}))
    return folder


def test_the_prior_curve_puts_runs_in_order_of_training_epochs_with_errors_over_their_floors(tmp_path):
    long = fake_evaluated_run(tmp_path / "long", 32, 960.0, 0.55, 0.15)
    short = fake_evaluated_run(tmp_path / "short", 8, 240.0, 0.7, 0.3,  # predict.py's sets since 2026-12-07
                               judged=("samples_at_real_depths_vs_real", "real_vs_real"))
    figures = benchmark("prior_curve", str(long), str(short), "--out", str(tmp_path / "curve.png"))
    assert [p["prior_epochs"] for p in figures["points"]] == [8, 32] and figures["points"][0]["prior_minutes"] == 4
    assert figures["points"][0]["tissue_x_floor"] == {"tissue_fraction_error": 2.0, "tissue_map_error": 1.0,
                                                      "shape_error": 3.0}
    assert figures["points"][1]["c2st"]["samples_vs_real"]["accuracy"] == 0.55 and (tmp_path / "curve.png").exists()
    assert set(figures["points"][0]["c2st"]) == {"samples_at_real_depths_vs_real", "real_vs_real"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.prior_curve", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error:") and "missing" in done.stderr
