"""One tiny end-to-end run: train.py writes a complete run folder, predict.py rebuilds everything from it."""

import csv
import json
from pathlib import Path

import pytest
import tensorflow as tf

import dataset
import predict
import train
import utils

TINY = ["--image-size", "32", "--hidden-channels", "8", "--num-res-blocks", "1", "--num-embeddings", "16",
        "--embedding-dim", "4", "--batch-size", "16"]


@pytest.fixture(scope="module")
def tiny_run(demo_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = ["--data-dir", str(demo_dir), "--runs-dir", str(runs), "--name", "tiny", "--epochs", "2", *TINY]
    assert train.main(args) == 0
    return runs / "tiny"


def test_train_writes_a_complete_run_folder(tiny_run):
    for name in ["config.json", "vqvae.keras", "history.csv", "ssim.png", "losses.png", "recon.png",
                 "metrics.json"]:
        assert (tiny_run / name).is_file(), name
    assert not list(tiny_run.glob(".*")), "temporary files left behind"
    config = utils.load_run_config(tiny_run)
    assert (config.image_size, config.num_embeddings, config.epochs) == (32, 16, 2)
    rows = list(csv.DictReader(open(tiny_run / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for row in rows:
        assert 0 < float(row["val_ssim"]) <= 1 and 0 < float(row["train_ssim"]) <= 1
        assert 1 <= float(row["val_codes_used"]) <= 16
    metrics = json.loads((tiny_run / "metrics.json").read_text())["vqvae"]
    assert metrics["val_ssim"] == pytest.approx(float(rows[-1]["val_ssim"]), abs=1e-5)
    assert set(metrics["val_ssim_floors"]) == {"all-black", "bilinear x4 down/up"}


def test_config_round_trips_through_json(tiny_run):
    config = utils.load_run_config(tiny_run)
    utils.save_config(config, tiny_run)
    assert utils.load_run_config(tiny_run) == config


def test_predict_rebuilds_from_the_run_folder_and_reports_baselines(tiny_run, capsys):
    assert predict.main(["--run", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "vqvae" in out and "bilinear_x4" in out and "all_black" in out
    for name in ["ssim_hist.png", "recon_test.png"]:
        assert (tiny_run / name).is_file()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
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


def test_predict_uses_newest_run_by_default(tiny_run, monkeypatch, capsys):
    monkeypatch.chdir(tiny_run.parent.parent)
    assert predict.main(["--runs-dir", str(tiny_run.parent), "--split", "validate"]) == 0
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
    assert "already exists" in capsys.readouterr().err
    assert (tiny_run / "vqvae.keras").read_bytes() == before
