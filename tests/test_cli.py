"""One tiny end-to-end run: train.py writes a complete run folder, predict.py rebuilds everything from it."""

import contextlib
import csv
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import dataset
import modules
import predict
import realism
import train
import utils
from conftest import TINY
from run_state import Run

pytestmark = pytest.mark.slow  # the module trains one tiny run end to end


@pytest.fixture(scope="module")
def tiny_run(demo_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = ["--data-dir", str(demo_dir), "--runs-dir", str(runs), "--name", "tiny", "--epochs", "2", *TINY,
            "--prior-epochs", "2"]
    assert train.main(args) == 0
    return runs / "tiny"


def test_train_writes_a_complete_run_folder(tiny_run):
    for name in ["config.json", "vqvae.keras", "history.csv", "ssim.png", "losses.png", "recon.png",
                 "metrics.json", "codes_train.npz", "codes_validate.npz", "prior.keras", "prior_history.csv",
                 "prior_loss.png", "segmenter.keras", "segmenter_history.csv"]:
        assert (tiny_run / name).is_file(), name
    assert not list(tiny_run.glob(".*")), "temporary files left behind"
    config = Run.open(tiny_run).read_config()
    assert (config.image_size, config.num_embeddings, config.epochs) == (32, 16, 2)
    rows = list(csv.DictReader(open(tiny_run / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for row in rows:
        assert 0 < float(row["val_ssim"]) <= 1 and 0 < float(row["train_ssim"]) <= 1
        assert 1 <= float(row["val_codes_used"]) <= 16
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["vqvae"]["val_ssim"] == pytest.approx(float(rows[-1]["val_ssim"]), abs=1e-5)
    assert set(metrics["vqvae"]["val_ssim_floors"]) == {"all_black", "bilinear_x4"}  # as in "reconstruction"
    codes, positions = Run.open(tiny_run).read_codes("train")
    assert codes.shape == (64, 8, 8) and 0 <= codes.min() and codes.max() < 16  # 2 subjects x 32 slices
    np.testing.assert_allclose(np.sort(positions), np.repeat(np.arange(32) / 31, 2), atol=1e-6)  # their depths
    prior_rows = list(csv.DictReader(open(tiny_run / "prior_history.csv")))
    assert len(prior_rows) == 2
    assert float(prior_rows[-1]["val_bits_per_code"]) == pytest.approx(metrics["prior"]["val_bits_per_code"],
                                                                        rel=1e-4)
    assert 0 < metrics["prior"]["val_bits_per_code"] < 2 * np.log2(16)


def test_config_round_trips_through_json(tiny_run):
    run = Run.open(tiny_run)
    config = run.read_config()
    run.write_config(config)
    assert run.read_config() == config


@pytest.fixture(scope="module")
def predicted(tiny_run):
    """predict.py once on the tiny run, with the realism diagnostics and two judges a fold (three, the default, only
    cost time here): (what it printed, the metrics it wrote)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert predict.main(["--run", str(tiny_run), "--num-samples", "3", "--seed", "5", "--realism-draws", "2",
                             "--realism-diagnostics", "--realism-judges", "2"]) == 0
    return printed.getvalue(), json.loads((tiny_run / "metrics.json").read_text())


def test_predict_rebuilds_from_the_run_folder_reports_baselines_and_generates(tiny_run, predicted):
    out, metrics = predicted
    assert "vqvae" in out and "bilinear_x4" in out and "all_black" in out and "generated 3 brains" in out
    for name in ["ssim_hist.png", "recon_test.png", "samples.png"]:
        assert (tiny_run / name).is_file()
    samples = sorted((tiny_run / "samples").glob("*.png"))
    assert len(samples) == 3
    assert np.asarray(Image.open(samples[0])).shape == (32, 32)
    assert "vqvae" in metrics  # the training section is kept
    rec = metrics["reconstruction"]
    assert rec["split"] == "test" and rec["num_images"] == 32
    for name in ["vqvae", "bilinear_x4", "all_black"]:
        for key in ["ssim", "ssim_brain_crop", "psnr"]:
            assert set(rec[name][key]) == {"mean", "median", "min"}
    # the all-black floor, computed independently on the same slices
    images = dataset.load_images(dataset.split_files(rec["data_dir"], "test"), 32)
    black = tf.image.ssim(tf.constant(images), tf.zeros_like(images), max_val=1.0).numpy()
    assert rec["all_black"]["ssim"]["mean"] == pytest.approx(float(black.mean()), abs=1e-5)
    assert rec["all_black"]["ssim_brain_crop"]["mean"] < rec["all_black"]["ssim"]["mean"]
    gen = metrics["samples"]
    assert gen["num_samples"] == 3 and gen["seed"] == 5 and gen["temperature"] == 1.0
    assert gen["conditioned_on_depth"]  # the demo's names carry slice numbers
    assert set(gen["c2st"]) == {"real_vs_real", "reconstructions_vs_real", "samples_vs_real",
                                "samples_at_real_depths_vs_real"}
    for result in gen["c2st"].values():
        assert result["n_per_set"] == 32 and 0 <= result["ci95"][0] <= result["accuracy"] <= result["ci95"][1] <= 1
        assert len(result["draws"]) == 2 and result["accuracy"] == pytest.approx(np.mean(result["draws"]))
        assert len(result["judges_alone"]) == 2  # how far one judge alone would have moved
    assert "realism: can a small CNN tell these from real test slices?" in out and "judges alone" in out
    assert "2 judges a fold" in out and gen["c2st_reference"]["judge"]["judges"] == 2
    for key in ["samples", "real"]:
        assert -1 <= gen["nearest_train_ssim"][key]["min"] <= gen["nearest_train_ssim"][key]["mean"] <= 1
        assert 0 <= gen["brain_fraction"][key]["mean"] < 1
    assert gen["prior_bits_per_code"]["split"] == "test" and 0 < gen["prior_bits_per_code"]["value"] < 2 * np.log2(16)
    assert (tiny_run / "depths.png").is_file()
    anatomy = gen["anatomy"]  # the tissue report: the tiny run trained a segmenter (the demo set has segmentations)
    assert set(anatomy["segmenter_dice"]) == {"csf", "gray", "white"} and (tiny_run / "anatomy.png").is_file()
    for key in ("tissue_fraction_error", "tissue_map_error", "shape_error"):
        assert anatomy[key] >= 0 and anatomy["floor"][key] >= 0
    assert "tissue report" in out and len(anatomy["bands"]["generated"]) == 5
    dice = metrics["segmenter"]["val_dice"]  # (a 4-channel segmenter of 2 epochs at 32 px calls little: any value)
    assert set(dice) == {"csf", "gray", "white"} and all(0 <= value <= 1 for value in dice.values())


def test_no_realism_skips_the_test_and_the_tissue_report(tiny_run, tmp_path, capsys):
    assert predict.main(["--run", str(tiny_run), "--num-samples", "2", "--no-realism", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "realism:" not in out and "tissue report" not in out
    assert "anatomy" not in json.loads((tmp_path / "metrics.json").read_text())["samples"]
    assert (tmp_path / "samples.png").is_file() and not (tmp_path / "anatomy.png").exists()


def test_the_realism_references_are_measured_once_per_vqvae(tiny_run, predicted, capsys, monkeypatch):
    first = predicted[1]["samples"]
    measured = []
    nearest_ssim = realism.nearest_ssim
    monkeypatch.setattr(realism, "nearest_ssim", lambda q, p, k: measured.append(len(q)) or nearest_ssim(q, p, k))
    assert predict.main(["--run", str(tiny_run), "--num-samples", "3", "--seed", "5", "--realism-draws", "2",
                         "--realism-judges", "2"]) == 0
    assert capsys.readouterr().out.count(", measured before)") == 2  # real vs real, and the reconstructions
    again = json.loads((tiny_run / "metrics.json").read_text())["samples"]
    assert {k: again["c2st"][k] for k in ("real_vs_real", "reconstructions_vs_real")} == \
        {k: first["c2st"][k] for k in ("real_vs_real", "reconstructions_vs_real")}
    assert measured == [32]  # the copy check measured the samples only; the real slices' side was kept
    assert again["nearest_train_ssim"]["real"] == first["nearest_train_ssim"]["real"]
    reference = again["c2st_reference"]  # judged by another number of judges: measured anew
    assert realism.previous_references(again, {**reference, "judge": {**reference["judge"], "judges": 1}}) == ({}, None)


def test_a_data_folder_rebuilt_in_place_has_its_realism_references_measured_again(tiny_run, demo_dir, tmp_path,
                                                                                    capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    args = ["--run", str(tiny_run), "--data-dir", str(data), "--num-samples", "2", "--out", str(tmp_path / "out"),
            "--realism-judges", "1"]
    assert predict.main(args) == 0 and predict.main(args) == 0
    assert capsys.readouterr().out.count(", measured before)") == 1  # the same data: real vs real kept
    test_file = sorted((data / "keras_png_slices_test").glob("*.png"))[5]
    image = np.asarray(Image.open(test_file))
    Image.fromarray(np.ascontiguousarray(image[:, ::-1])).save(test_file)  # same folder, same names, other slices
    assert predict.main(args) == 0
    assert ", measured before)" not in capsys.readouterr().out


def test_the_data_stamp_sees_the_held_out_images_and_the_training_files(demo_dir):
    images = np.zeros((2, 4, 4, 1), "float32")
    files = dataset.split_files(demo_dir, "train")
    stamp = realism.data_stamp([images, images], files)
    assert realism.data_stamp([images.copy(), images], list(files)) == stamp
    changed = images.copy()
    changed[1, 2, 3] = 0.5
    assert realism.data_stamp([images, changed], files) != stamp
    assert realism.data_stamp([images, images], files[:-1]) != stamp


def test_a_vqvae_saved_before_the_background_setting_decodes_with_the_runs_setting(tiny_run, tmp_path):
    run = Run(tmp_path / "old")
    shutil.copytree(tiny_run, run.path)
    vqvae = run.stage("vqvae").load_model()
    vqvae.background = 0.0  # what a VQ-VAE saved before --background existed reads back as
    vqvae.save(run.stage("vqvae").checkpoint)
    assert run.stage("vqvae").load_model().background == 0.0
    assert run.load_vqvae().background == run.read_config().background == 0.02


def test_the_sharpening_epochs_train_the_decoder_alone_and_keep_the_codes(demo_dir, tmp_path, capsys):
    def vqvae(name, *extra):
        args = ["--data-dir", str(demo_dir), "--runs-dir", str(tmp_path), "--name", name, *TINY, "--stage", "vqvae",
                "--learning-rate", "1e-2", *extra]
        assert train.main(args) == 0
        return Run.open(tmp_path / name).load_vqvae()

    plain = vqvae("plain", "--epochs", "2")
    sharpened = vqvae("sharpened", "--epochs", "4", "--sharpen-epochs", "2", "--spectral-loss", "0.5")
    assert "epochs 3-4 train it alone" in capsys.readouterr().out
    # the same seed and the same two whole-model epochs (the cosine spans those), then the decoder alone
    for part in ("encoder", "quantizer"):
        for before, after in zip(getattr(plain, part).get_weights(), getattr(sharpened, part).get_weights()):
            np.testing.assert_array_equal(after, before)
    moved = [np.abs(a - b).max() for a, b in zip(plain.decoder.get_weights(), sharpened.decoder.get_weights())]
    assert min(moved) > 1e-6
    stage = Run.open(tmp_path / "sharpened").stage("vqvae")
    assert len(stage.read_history()["seconds"]) == 4
    with warnings.catch_warnings():  # its optimizer state fits the decoder's weights: a resumed run keeps it
        warnings.simplefilter("error")
        checkpoint = stage.load_model()
    assert checkpoint.codes_frozen and checkpoint.loss.weight == 0.5 and not checkpoint.encoder.trainable
    # stopped after the first sharpening epoch (its checkpoint stands in for that epoch's): resumes sharpening
    Run.open(tmp_path / "sharpened")._update_progress("vqvae", epochs_done=3, finished=False)
    assert train.main(["--resume", str(tmp_path / "sharpened"), "--stage", "vqvae"]) == 0
    assert "resuming the VQ-VAE after epoch 3 of 4" in capsys.readouterr().out
    resumed = Run.open(tmp_path / "sharpened").load_vqvae()
    for before, after in zip(plain.encoder.get_weights(), resumed.encoder.get_weights()):
        np.testing.assert_array_equal(after, before)
    assert not np.array_equal(resumed.decoder.get_weights()[-1], sharpened.decoder.get_weights()[-1])
    assert train.main(["--data-dir", str(demo_dir), "--runs-dir", str(tmp_path), "--name", "bad", *TINY,
                       "--epochs", "2", "--sharpen-epochs", "2"]) == 2
    assert "--sharpen-epochs must be 0 or more and below --epochs (2)" in capsys.readouterr().err


def test_same_seed_same_samples(tiny_run, tmp_path):
    drawn = []
    for out in ("a", "b"):
        assert predict.main(["--run", str(tiny_run), "--num-samples", "3", "--seed", "5", "--realism-samples", "0",
                             "--out", str(tmp_path / out)]) == 0
        drawn.append([p.read_bytes() for p in sorted((tmp_path / out / "samples").glob("*.png"))])
    assert len(drawn[0]) == 3 and drawn[0] == drawn[1]


def test_generation_at_given_depths(tiny_run, capsys):
    args = ["--run", str(tiny_run), "--num-samples", "4", "--realism-samples", "0"]
    assert predict.main([*args, "--slice-position", "0.2", "0.8"]) == 0
    assert "at depths 0.20, 0.80" in capsys.readouterr().out
    assert len(list((tiny_run / "samples").glob("*.png"))) == 4
    assert predict.main([*args, "--slice-position", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--slice-position takes depths from 0" in err and err.count("\n") == 1
    assert predict.main([*args, "--top-k", "2"]) == 0  # among each position's 2 likeliest codes
    assert "top-k 2" in capsys.readouterr().out
    assert json.loads((tiny_run / "metrics.json").read_text())["samples"]["top_k"] == 2
    assert predict.main([*args, "--top-k", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--top-k must be 0" in err and err.count("\n") == 1
    assert predict.main([*args, "--realism-judges", "0"]) == 2
    err = capsys.readouterr().err
    assert "--realism-judges must be 1 or more" in err and err.count("\n") == 1


def test_predict_uses_newest_run_by_default(tiny_run, monkeypatch, capsys):
    monkeypatch.chdir(tiny_run.parent.parent)
    assert predict.main(["--runs-dir", str(tiny_run.parent), "--split", "validate", "--realism-samples", "0"]) == 0
    assert f"run: {tiny_run}" in capsys.readouterr().out
    assert (tiny_run / "recon_validate.png").is_file()


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: tmp, "has no config.json"),
])
def test_predict_bad_run_folder_exit_2(tmp_path, capsys, make, expected):
    assert predict.main(["--run", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_predict_without_any_run(tmp_path, capsys):
    assert predict.main(["--runs-dir", str(tmp_path)]) == 2
    assert "no run found" in capsys.readouterr().err


def test_existing_run_name_is_refused_and_left_untouched(tiny_run, demo_dir, capsys):
    before = (tiny_run / "vqvae.keras").read_bytes()
    args = ["--data-dir", str(demo_dir), "--runs-dir", str(tiny_run.parent), "--name", "tiny", *TINY]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and f"--resume {tiny_run}" in err  # says what to type
    assert (tiny_run / "vqvae.keras").read_bytes() == before


def vqvae_only_copy(tiny_run, dest, names=("config.json", "vqvae.keras")):
    """A copy of the tiny run as it was after stage 1: its VQ-VAE trained, no prior yet."""
    dest.mkdir()
    for name in names:
        (dest / name).write_bytes((tiny_run / name).read_bytes())
    progress = json.loads((tiny_run / "progress.json").read_text())
    (dest / "progress.json").write_text(json.dumps({"stages": ["vqvae"], "vqvae": progress["vqvae"]}))
    return dest


def test_the_prior_stage_is_reached_through_resume(tiny_run, tmp_path, capsys):
    assert train.main(["--stage", "prior"]) == 2
    assert "add --resume runs/NAME" in capsys.readouterr().err
    assert train.main(["--stage", "prior", "--run", str(tiny_run)]) == 2  # the old way says what to type now
    assert f"python train.py --resume {tiny_run} --stage prior" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    Run(empty).write_config(Run.open(tiny_run).read_config())
    assert train.main(["--resume", str(empty), "--stage", "prior"]) == 2
    assert "no trained VQ-VAE" in capsys.readouterr().err


def test_a_finished_prior_is_kept_unless_retrain_is_asked_for(tiny_run, tmp_path, capsys):
    before = (tiny_run / "prior.keras").read_bytes()
    assert train.main(["--resume", str(tiny_run), "--stage", "prior", "--prior-layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "drop --prior-layers" in err and "--retrain" in err
    assert train.main(["--resume", str(tiny_run), "--stage", "prior"]) == 0
    assert "trained already" in capsys.readouterr().out and (tiny_run / "prior.keras").read_bytes() == before
    assert train.main(["--resume", str(tiny_run), "--retrain"]) == 2
    assert "add --stage prior" in capsys.readouterr().err

    run = tmp_path / "retrained"
    shutil.copytree(tiny_run, run)
    assert train.main(["--resume", str(run), "--stage", "prior", "--retrain", "--prior-layers", "1",
                       "--prior-epochs", "1"]) == 0
    assert "retraining the prior" in capsys.readouterr().out
    assert Run.open(run).read_config().prior_layers == 1
    assert Run.open(run).stage("prior").load_model().num_layers == 1
    rows = list(csv.DictReader(open(run / "prior_history.csv")))
    assert [r["epoch"] for r in rows] == ["1"]  # a new history, not the old one continued
    assert Run.open(run).stage("vqvae").checkpoint.read_bytes() == (tiny_run / "vqvae.keras").read_bytes()


def test_resume_trains_the_prior_of_a_run_whose_vqvae_is_trained(tiny_run, tmp_path, capsys):
    run = vqvae_only_copy(tiny_run, tmp_path / "copy",
                          ["config.json", "vqvae.keras", "codes_train.npz", "codes_validate.npz"])
    assert train.main(["--resume", str(run), "--stage", "prior", "--image-size", "64"]) == 2
    assert "drop --image-size" in capsys.readouterr().err
    assert train.main(["--resume", str(run), "--stage", "prior", "--prior-epochs", "1", "--prior-layers", "1",
                       "--prior-attention-layers", "1", "--prior-layout-levels", "4"]) == 0
    assert "two-level prior: a 4x4 layout of 4 intensity levels" in capsys.readouterr().out
    assert Run.open(run).read_config().prior_layers == 1
    prior = Run.open(run).stage("prior").load_model()
    assert prior.num_layers == 1 and prior.attention_layers == 1 and prior.layout_levels == 4
    metrics = json.loads((run / "metrics.json").read_text())["prior"]
    assert 0 < metrics["val_bits_per_code"] < 2 * np.log2(16)  # the codes' NLL, layout included
    assert predict.main(["--run", str(run), "--num-samples", "2", "--realism-draws", "1", "--realism-judges", "1"]) == 0
    out = capsys.readouterr().out  # the test: samples at the real slices' depths; the rest are diagnostics
    assert "samples given validation layouts" not in out and "depths drawn from training" not in out
    judged = json.loads((run / "metrics.json").read_text())["samples"]["c2st"]
    assert "samples_at_real_depths_vs_real" in judged and "samples_vs_real" not in judged
    assert predict.main(["--run", str(run), "--num-samples", "2", "--realism-draws", "1", "--realism-judges", "1",
                         "--realism-diagnostics"]) == 0
    out = capsys.readouterr().out
    assert "samples given validation layouts, depths" in out and "VQ-VAE reconstructions" in out
    samples = json.loads((run / "metrics.json").read_text())["samples"]
    assert 0 < samples["prior_bits_per_code"]["value"] < 2 * np.log2(16)
    assert 0 <= samples["c2st"]["samples_given_real_layouts_vs_real"]["accuracy"] <= 1  # the lower level, judged


def test_predict_refuses_a_prior_of_another_codebook_size(tiny_run, tmp_path, capsys):
    import modules

    run = vqvae_only_copy(tiny_run, tmp_path / "mismatch")
    prior = modules.PixelCNNPrior(num_embeddings=32, grid_shape=(8, 8), channels=4, num_layers=1, kernel_size=3)
    prior.build((None, 8, 8))
    prior.save(run / "prior.keras")
    assert predict.main(["--run", str(run), "--num-samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "predicts 32 codes but the VQ-VAE has 16" in err and err.count("\n") == 1


def test_guidance_is_refused_for_a_prior_that_never_saw_a_slice_without_its_depth(tiny_run, tmp_path, capsys):
    out = tmp_path / "guided"
    assert predict.main(["--run", str(tiny_run), "--num-samples", "1", "--guidance", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--guidance needs a prior trained with --prior-condition-dropout" in err and err.count("\n") == 1


def test_failed_prior_stage_leaves_the_run_as_it_was(tiny_run, tmp_path, capsys):
    run = vqvae_only_copy(tiny_run, tmp_path / "no_codes")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert train.main(["--resume", str(run), "--stage", "prior", "--data-dir", str(tmp_path / "gone"),
                       "--prior-layers", "3"]) == 2
    assert "gone does not exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_the_prior_capacity_benchmark_trains_samples_and_draws_its_figure_from_a_run(tiny_run, tmp_path):
    """Its quickest form under JAX (as on the GPU machine), then its figure from the samples it wrote."""
    from test_benchmarks import benchmark

    out = tmp_path / "capacity"
    figures = benchmark("prior_capacity", "--run", str(tiny_run), "--budget", "2", "--sizes", "8x1", "8x1k5a1",
                        "--rows", "1", "--out", str(out), backend="jax")
    assert list(figures["sizes"]) == ["8x1", "8x1k5a1"]
    assert figures["sizes"]["8x1k5a1"]["parameters"] > figures["sizes"]["8x1"]["parameters"]  # attention, 5x5
    assert all(s["epochs"] >= 1 and 0 < s["val_bits_per_code"] < 16 for s in figures["sizes"].values())
    with np.load(out / "capacity_samples.npz") as saved:
        for key in ("8x1_t1.0", "8x1_t0.7", "8x1_t0.0", "8x1k5a1_t1.0"):
            assert saved[key].shape == (8, 8, 8) and 0 <= saved[key].min() and saved[key].max() < 16, key
    benchmark("prior_capacity", "--run", str(tiny_run), "--figure", str(out), expect_json=False)
    assert {p.name for p in out.glob("capacity_*.png")} == {"capacity_8x1.png", "capacity_8x1k5a1.png"}


def test_the_sampling_rules_benchmark_judges_each_rule_on_validation_halves_only(tiny_run, tmp_path):
    """Rules judged against the validation slices, the ideal the training slices; the test split is not read (here it
    does not exist)."""
    from test_benchmarks import benchmark

    data = dataset.make_demo(tmp_path / "demo", subjects=(1, 2, 1), seed=3, verbose=False)
    shutil.rmtree(data / "keras_png_slices_test")
    figures = benchmark("sampling_rules", "--run", str(tiny_run), "--data-dir", str(data), "--temperatures", "0.5",
                        "1.0", "--top-k", "0", "2", "--judges", "1")
    assert figures["judges"] == 1  # one judge a fold here: the rules, not the ensemble, are under test
    assert list(figures["rules"]) == ["real training slices"] + [f"T {t}, guidance 1.0, top-k {k}" for t in (0.5, 1.0)
                                                             for k in (0, 2)]
    chosen = figures["chosen"]
    assert figures["rules"][chosen]["accuracy"] == min(r["accuracy"] for name, r in figures["rules"].items()
                                                       if name.startswith("T "))
    for row in figures["rules"].values():
        assert 0 <= row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] <= 1
        assert set(row["tissue_x_floor"]) == {"tissue_fraction_error", "tissue_map_error", "shape_error"}
    assert figures["rules"]["real training slices"]["tissue_x_floor"]["shape_error"] == 1.0  # the floor itself


def test_a_run_folder_written_by_the_previous_layout_still_predicts(demo_dir, tmp_path, capsys):
    """tests/fixtures/run_632aad0: a tiny two-level run trained by commit 632aad0, before utils.py was split into
    run_state.py and realism.py; its folder must load and predict unchanged."""
    run = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "fixtures" / "run_632aad0", run)
    assert predict.main(["--run", str(run), "--data-dir", str(demo_dir), "--num-samples", "2",
                         "--realism-samples", "8", "--realism-draws", "1"]) == 0
    out = capsys.readouterr().out
    assert "samples at the validation depths" in out and "prior NLL on the test split" in out
    assert {"reconstruction", "samples", "vqvae", "prior"} <= set(json.loads((run / "metrics.json").read_text()))


def test_sample_diagnosis_draws_each_code_given_the_true_codes_before_it(tiny_run, tmp_path):
    from benchmarks import sample_diagnosis

    run = Run.open(tiny_run, read_only=True)
    prior = run.stage("prior").load_model(float32=True)
    codes, positions = run.read_codes("validate")
    codes, positions = codes[:6].astype("int32"), positions[:6]
    vqvae, levels = run.load_vqvae(), prior.layout_levels
    layouts = utils.code_layouts(vqvae, codes, levels) if levels else None
    greedy = sample_diagnosis.teacher_forced(prior, vqvae, codes, positions, 0.0, seed=0)
    condition = np.asarray(modules.slice_position_features(positions, prior.num_conditions // 2))
    logits = prior(prior.pack_inputs(codes, condition, layouts))
    expected = np.asarray(logits["codes"] if levels else logits).argmax(-1)
    np.testing.assert_array_equal(greedy, expected)  # T = 0: the most likely code given the true ones before
    drawn = [sample_diagnosis.teacher_forced(prior, vqvae, codes, positions, 1.0, seed=s) for s in (0, 0, 1)]
    assert drawn[0].shape == codes.shape and 0 <= drawn[0].min() and drawn[0].max() < prior.num_embeddings
    np.testing.assert_array_equal(drawn[0], drawn[1])  # the same seed, the same draws
    assert (drawn[0] != drawn[2]).any()
    assert sample_diagnosis.main(["--run", str(tiny_run), "--out", str(tmp_path), "--temperatures", "1.0"]) == 0
    assert (tmp_path / "diagnosis.png").is_file()
