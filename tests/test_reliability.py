"""Runs survive crashes: kill -9 at any moment and --resume continues from the last completed epoch; a death in
the middle of a checkpoint write leaves the previous checkpoint; a diverging loss stops with one line; the same
seed gives the same numbers; an unwritable output folder is refused before any work."""

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import run_state
import train
import utils
from conftest import run_script
from run_state import Run


def history(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_complete(run, vqvae_epochs, prior_epochs):
    progress = json.loads((run / "progress.json").read_text())
    assert progress["vqvae"] == {"epochs_done": vqvae_epochs, "finished": True}
    assert progress["prior"] == {"epochs_done": prior_epochs, "finished": True}
    for name, epochs in [("history.csv", vqvae_epochs), ("prior_history.csv", prior_epochs)]:
        rows = history(run / name)
        assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1)), name
        seconds = [float(r["seconds"]) for r in rows]
        assert seconds == sorted(seconds), f"{name}: time runs backwards"
    assert Run.open(run).stage("vqvae").load_model().num_embeddings == 16
    assert Run.open(run).stage("prior").load_model().num_layers == 2
    assert not list(run.glob(f".*{utils.TEMP_MARK}*")), "temporary files left behind"


@pytest.mark.serial  # races the clock (a signal or kill at a moment): CI runs it alone
@pytest.mark.slow
@pytest.mark.parametrize("stage, after_epochs", [("vqvae", 2), ("prior", 1)])
def test_kill_9_then_resume_continues(tiny_args, tmp_path, stage, after_epochs):
    args = tiny_args(tmp_path / "runs", "killed", "--epochs", "5", "--prior-epochs", "3")
    script = str(Path(train.__file__))
    run = tmp_path / "runs" / "killed"
    process = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        try:
            progress = json.loads((run / "progress.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            progress = {}
        if progress.get(stage, {}).get("epochs_done", 0) >= after_epochs:
            break
        time.sleep(0.02)
    assert process.poll() is None, "training ended before it could be killed: " + process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = json.loads((run / "progress.json").read_text())[stage]["epochs_done"]
    assert after_epochs <= done < (5 if stage == "vqvae" else 3)
    Run.open(run).stage(stage).load_model()  # the checkpoint on disk is whole

    again = run_script(args)
    assert again.returncode == 2 and f"--resume {run}" in again.stderr  # the same command says what to type
    resumed = run_script(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming the {'VQ-VAE' if stage == 'vqvae' else 'prior'} after epoch {done}" in resumed.stdout
    check_complete(run, 5, 3)


@pytest.mark.serial  # races the clock (a signal or kill at a moment): CI runs it alone
@pytest.mark.slow
def test_death_during_a_checkpoint_write_keeps_the_previous_checkpoint(tiny_args, tmp_path, monkeypatch):
    args = tiny_args(tmp_path / "runs", "torn", "--epochs", "3", "--prior-epochs", "1")
    run = tmp_path / "runs" / "torn"
    real_save = run_state.Stage.save_checkpoint
    calls = []

    def dies_halfway_through_the_second_save(stage, model, epochs_done):
        calls.append(epochs_done)
        if len(calls) == 2:
            def write_half_then_die(tmp):
                model.save(tmp)
                data = Path(tmp).read_bytes()
                Path(tmp).write_bytes(data[: len(data) // 2])
                raise KeyboardInterrupt("killed during the checkpoint write")

            utils.atomic_write(stage.checkpoint, write_half_then_die)
        real_save(stage, model, epochs_done)

    monkeypatch.setattr(run_state.Stage, "save_checkpoint", dies_halfway_through_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    assert json.loads((run / "progress.json").read_text())["vqvae"]["epochs_done"] == 1
    Run.open(run).stage("vqvae").load_model()  # epoch 1's checkpoint, whole
    (run / f".vqvae{utils.TEMP_MARK}stale.keras").write_bytes(b"half")  # what a real kill -9 leaves

    monkeypatch.setattr(run_state.Stage, "save_checkpoint", real_save)
    assert train.main(["--resume", str(run)]) == 0
    check_complete(run, 3, 1)


def test_divergence_is_a_loss_that_is_nan_infinite_or_over_the_ceiling(tmp_path):
    stage = Run(tmp_path / "run").stage("prior")
    watch = train.StopOnDivergence(stage, "--prior-learning-rate", 1e-3, ceiling=10 * np.log(16))
    watch.on_train_batch_end(0, {"loss": 3.0})  # a prior that learns: no stop
    for loss in (np.nan, np.inf, 28.0, 4e29):
        message = f"the prior loss became {loss:.3g} in epoch 1, before any prior epoch finished"
        with pytest.raises(train.Diverged, match=re.escape(message)):
            watch.on_train_batch_end(0, {"loss": loss})
    unbounded = train.StopOnDivergence(Run(tmp_path / "run").stage("vqvae"), "--learning-rate", 1e-3)
    unbounded.on_train_batch_end(0, {"loss": 1e6})  # the VQ-VAE has no ceiling
    with pytest.raises(train.Diverged, match="VQ-VAE loss became nan"):
        unbounded.on_train_batch_end(0, {"loss": np.nan})


@pytest.mark.slow  # trains a run
def test_diverging_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_args, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert train.main(tiny_args(runs, "nan", "--epochs", "2", "--prior-learning-rate", "1e30")) == 2
    err = capsys.readouterr().err
    # NaN, or a finite loss over ten times a uniform prior's: which one depends on the order of the batches
    assert err.count("\n") == 1 and re.search(r"prior loss became (nan|inf|[\d.]+e\+\d+) in epoch 1", err)
    assert "--prior-learning-rate" in err
    run = runs / "nan"
    assert json.loads((run / "progress.json").read_text())["vqvae"]["finished"]
    Run.open(run).stage("vqvae").load_model()
    assert not (run / "prior.keras").exists()

    assert train.main(tiny_args(runs, "nan_vqvae", "--learning-rate", "1e30")) == 2
    err = capsys.readouterr().err
    assert "VQ-VAE loss became nan in epoch 1" in err and "--learning-rate" in err
    assert not (runs / "nan_vqvae").exists()  # nothing worth keeping: no half-made run folder


@pytest.mark.slow
def test_same_seed_same_metrics(tiny_args, tmp_path):
    # Run a in this process, after something else has set TensorFlow's global seed (as an earlier run, or any
    # keras.utils.set_random_seed call, does in a notebook); run b in a fresh process, as a user types the command.
    # The data order takes the global seed too, so the runs agree only if train.py sets the run's seed first.
    keras.utils.set_random_seed(12345)
    assert train.main(tiny_args(tmp_path, "a", "--epochs", "2", "--prior-epochs", "1")) == 0
    done = run_script(tiny_args(tmp_path, "b", "--epochs", "2", "--prior-epochs", "1"))
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("history.csv", "prior_history.csv"):
        a, b = history(tmp_path / "a" / name), history(tmp_path / "b" / name)
        for column in a[0]:
            if column != "seconds":
                np.testing.assert_allclose([float(r[column]) for r in a], [float(r[column]) for r in b],
                                           rtol=1e-5, err_msg=f"{name}: {column}")


def test_unwritable_output_folder_is_refused_before_any_work(tiny_args, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert train.main(tiny_args(blocker / "runs", "x")) == 2
    err = capsys.readouterr().err
    assert "cannot write run folders" in err and "--runs-dir" in err


@pytest.mark.slow  # trains a run
def test_an_existing_run_is_continued_only_by_resume_with_its_own_settings(tiny_args, tmp_path, capsys):
    assert train.main(tiny_args(tmp_path, "r", "--epochs", "1", "--stage", "vqvae")) == 0
    before = (tmp_path / "r" / "vqvae.keras").read_bytes()
    for epochs in ("1", "2"):  # the same command or other settings: refused, with the command to type
        assert train.main(tiny_args(tmp_path, "r", "--epochs", epochs, "--stage", "vqvae")) == 2
        err = capsys.readouterr().err
        assert "already exists" in err and f"--resume {tmp_path / 'r'}" in err
    assert (tmp_path / "r" / "vqvae.keras").read_bytes() == before
    # --resume takes its settings from the run
    assert train.main(["--resume", str(tmp_path / "r"), "--epochs", "9"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "r")]) == 0  # finished: nothing to do
    assert (tmp_path / "r" / "vqvae.keras").read_bytes() == before
