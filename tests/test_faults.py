"""Faults a researcher meets on a shared workstation, each provoked for real: Ctrl-C and SIGTERM, the same run
started twice, a full disk, damaged run files, odd data folders, an output folder that cannot be written. Each
ends with one line (what happened, what to type), a non-zero exit code, no traceback, and a run that is intact
and resumes."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import predict
import train
import utils
from conftest import ROOT, TINY, brainish, run_script, write_png
from test_reliability import check_complete
from run_state import Run


def launch(args, logs: Path, script="train.py", **kwargs) -> subprocess.Popen:
    """The script in its own process, its output into logs/out and logs/err."""
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], stdout=open(logs / "out", "w"),
                            stderr=open(logs / "err", "w"), **kwargs)


def epochs_done(run: Path, stage: str) -> int:
    try:
        return json.loads((run / "progress.json").read_text()).get(stage, {}).get("epochs_done", 0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def wait_until(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the process ended before the moment the test waits for"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def one_line(text: str) -> str:
    assert "Traceback" not in text and text.count("\n") == 1, text[-3000:]
    return text


def no_temporaries(run: Path) -> bool:
    return not list(run.glob(f".*{utils.TEMP_MARK}*")) and not (run / Run.LOCK).exists()


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.serial  # races the clock (a signal or kill at a moment): CI runs it alone
@pytest.mark.slow
@pytest.mark.parametrize("stage, signal_number", [("vqvae", signal.SIGINT), ("prior", signal.SIGTERM)])
def test_a_signal_stops_training_in_seconds_with_one_line_and_the_run_resumes(tiny_args, tmp_path, stage,
                                                                             signal_number):
    run = tmp_path / "runs" / "stopped"
    process = launch(tiny_args(tmp_path / "runs", "stopped", "--epochs", "12", "--prior-epochs", "8"), tmp_path)
    wait_until(lambda: epochs_done(run, stage) >= 1, process)
    sent = time.time()
    process.send_signal(signal_number)
    code = process.wait(timeout=60)
    assert code == 128 + signal_number, (tmp_path / "err").read_text()[-3000:]  # 130 for Ctrl-C, 143 for SIGTERM
    assert time.time() - sent < 20
    err = one_line((tmp_path / "err").read_text())
    done = epochs_done(run, stage)
    label = "VQ-VAE" if stage == "vqvae" else "prior"
    assert err.startswith(f"stopped by {signal_number.name}: ") and f"the {label}'s epoch {done} of" in err
    assert f"`python train.py --resume {run}`" in err
    Run.open(run).stage(stage).load_model()  # the checkpoint of the last completed epoch, whole
    assert no_temporaries(run)

    resumed = run_script(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    check_complete(run, 12, 8)


@pytest.mark.serial  # races the clock (a signal or kill at a moment): CI runs it alone
@pytest.mark.slow  # trains a run
def test_a_signal_before_the_first_epoch_leaves_no_run_folder(tiny_args, tmp_path):
    run = tmp_path / "runs" / "early"
    process = launch(tiny_args(tmp_path / "runs", "early", "--epochs", "12"), tmp_path)
    wait_until(lambda: (run / "config.json").exists(), process)  # the folder is made, no epoch has finished
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130, (tmp_path / "err").read_text()[-3000:]
    assert "nothing was kept" in one_line((tmp_path / "err").read_text())
    assert not run.exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # what Python ignored, on purpose
def test_a_stop_signal_swallowed_where_it_landed_still_stops_training_at_the_next_batch(capsys):
    """The handler raises wherever the main thread is; raised inside a __del__, Python prints "Exception ignored"
    and goes on (CI once saw a tiny run finish with exit code 0 after a Ctrl-C)."""

    class Finalised:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # handled in here: its Interrupted is swallowed

    batches = []

    def body(argv):
        Finalised()
        batches.append(1)  # the swallowed signal did not stop this
        train.StopOnDivergence(None, "--learning-rate", 1e-3).on_train_batch_end(0, {"loss": 1.0})
        batches.append(2)

    assert utils.script_main(body, []) == 130 and batches == [1]
    assert capsys.readouterr().err == "stopped by SIGINT\n"
    assert utils.script_main(lambda argv: None, []) == 0  # the next command starts afresh


def test_inside_training_a_stop_signal_is_raised_only_at_a_safe_point(capsys):
    """Raised by the handler inside TensorFlow's C++ calling back into Python, Interrupted once crashed train.py
    (a segmentation fault, no line): while training (utils.stops_at_safe_points) the handler only notes the signal,
    and the safe points raise it: a batch or epoch start in fit, a batch of utils.batched."""
    steps = []

    def body(argv):
        with utils.stops_at_safe_points():
            signal.raise_signal(signal.SIGTERM)
            steps.append("went on")  # noted, not raised here
            utils.batched(lambda batch: steps.append(len(batch)) or batch, np.zeros(3))  # raises before its batch
        steps.append("after the block")

    assert utils.script_main(body, []) == 143 and steps == ["went on"]
    assert capsys.readouterr().err == "stopped by SIGTERM\n"
    noted = train.StopOnDivergence(None, "--learning-rate", 1e-3)
    for hook in (lambda: noted.on_epoch_begin(1), lambda: noted.on_test_batch_end(0)):
        def at_a_hook(argv, hook=hook):
            with utils.stops_at_safe_points():
                signal.raise_signal(signal.SIGINT)
                hook()
                steps.append("not reached")
        assert utils.script_main(at_a_hook, []) == 130
    assert utils.script_main(lambda argv: (signal.raise_signal(signal.SIGINT), steps.append("not reached")), []) == 130
    assert "not reached" not in steps  # and outside the block the handler raises at once, as before

    def late(argv):  # a signal noted after the last safe point is raised as the block ends
        with utils.stops_at_safe_points():
            signal.raise_signal(signal.SIGTERM)
            steps.append("the block's last line")
        steps.append("not reached")

    assert utils.script_main(late, []) == 143 and steps[-1] == "the block's last line"
    assert utils.script_main(lambda argv: None, []) == 0


# ---------------------------------------------------------------------------------------------------------------
# The same run started twice
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.serial  # races the clock (a signal or kill at a moment): CI runs it alone
@pytest.mark.slow
def test_one_training_process_per_run_and_a_killed_one_blocks_nothing(tiny_args, tmp_path):
    run = tmp_path / "runs" / "twice"
    first = launch(tiny_args(tmp_path / "runs", "twice", "--epochs", "20", "--stage", "vqvae"), tmp_path / "first")
    wait_until(lambda: epochs_done(run, "vqvae") >= 1, first)
    second = run_script(["--resume", str(run)])
    assert second.returncode == 2
    assert f"is being trained by process {first.pid}" in one_line(second.stderr) and "--wait" in second.stderr

    first.kill()  # kill -9: the lock dies with its process
    first.wait()
    resumer = launch(["--resume", str(run)], tmp_path / "resumer")
    wait_until(lambda: str(resumer.pid) in (run / Run.LOCK).read_text() if (run / Run.LOCK).exists() else False,
               resumer)
    waiter = run_script(["--resume", str(run), "--wait"])  # waits for the resumer, then finds the stage done
    assert resumer.wait(timeout=300) == 0
    assert waiter.returncode == 0 and "trained already" in waiter.stdout
    assert epochs_done(run, "vqvae") == 20 and no_temporaries(run)


# ---------------------------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, megabytes: int):
    """A tmpfs of the given size at path, where mounting is allowed (root); yields whether it is mounted."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Writes a file into folder until its disk is full."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_full_disk_stops_training_with_one_line_keeps_the_run_and_resumes(tiny_args, tmp_path):
    with small_filesystem(tmp_path / "disk", 16) as mounted:
        runs = tmp_path / "disk" / "runs"
        run = runs / "full"
        args = tiny_args(runs, "full", "--epochs", "12", "--stage", "vqvae")
        if mounted:  # the disk fills up while the run trains
            process = launch(args, tmp_path)
            wait_until(lambda: epochs_done(run, "vqvae") >= 1, process)
            filler = fill(tmp_path / "disk")
            reason = "no space left on device"
        else:  # no tmpfs without root: a file size limit (a quota on one file) makes the next checkpoint fail
            process = launch(args, tmp_path)
            wait_until(lambda: epochs_done(run, "vqvae") >= 1, process)
            process.send_signal(signal.SIGINT)
            process.wait()
            limit = (run / "vqvae.keras").stat().st_size // 2

            def limited():
                import resource

                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

            process = launch(["--resume", str(run)], tmp_path, preexec_fn=limited)
            filler, reason = None, "file too large"
        assert process.wait(timeout=120) == 2
        err = one_line((tmp_path / "err").read_text())
        assert err.startswith("error: could not write ") and reason in err and f"--resume {run}" in err
        done = epochs_done(run, "vqvae")
        assert done >= 1 and no_temporaries(run)
        Run.open(run).stage("vqvae").load_model()  # the last good checkpoint, whole

        if filler is not None:
            filler.unlink()  # space again
        resumed = run_script(["--resume", str(run)])
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert Run.open(run).stage("vqvae").finished and epochs_done(run, "vqvae") == 12


# ---------------------------------------------------------------------------------------------------------------
# Damaged run files
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = ["--data-dir", str(demo_dir), "--runs-dir", str(runs), "--name", "whole", "--epochs", "1",
            "--prior-epochs", "1", *TINY]
    assert train.main(args) == 0
    return runs / "whole"


@pytest.fixture
def copy_of(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


QUICK = ["--num-samples", "1", "--realism-samples", "0"]


@pytest.mark.slow  # trains a run
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_is_named_with_the_command_that_retrains_it(copy_of, capsys, damage):
    for stage in ("vqvae", "prior"):
        checkpoint = copy_of / f"{stage}.keras"
        good = checkpoint.read_bytes()
        checkpoint.write_bytes(good[: len(good) // 2] if damage == "truncated" else b"")
        assert predict.main(["--run", str(copy_of), *QUICK]) == 2
        err = one_line(capsys.readouterr().err)
        assert f"cannot load {checkpoint}" in err and f"--resume {copy_of} --stage {stage} --retrain" in err
        checkpoint.write_bytes(good)
    (copy_of / "prior.keras").write_bytes(b"")
    assert train.main(["--resume", str(copy_of), "--stage", "prior", "--retrain"]) == 0  # the way out it named
    assert predict.main(["--run", str(copy_of), *QUICK]) == 0


@pytest.mark.slow  # trains a run
def test_a_damaged_vqvae_stops_a_prior_retraining_with_its_name(copy_of, capsys):
    (copy_of / "vqvae.keras").write_bytes(b"PK\x03\x04 not a whole zip")
    before = (copy_of / "prior.keras").read_bytes()
    assert train.main(["--resume", str(copy_of), "--stage", "prior", "--retrain"]) == 2
    assert f"cannot load {copy_of / 'vqvae.keras'}" in one_line(capsys.readouterr().err)
    assert (copy_of / "prior.keras").read_bytes() == before  # nothing discarded before the failure


@pytest.mark.slow  # trains a run
@pytest.mark.parametrize("name", ["config.json", "progress.json"])
def test_damaged_json_is_named(copy_of, capsys, name):
    (copy_of / name).write_text('{"image_size": 32, "epo')  # cut off in the middle
    assert train.main(["--resume", str(copy_of)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{copy_of / name} is damaged" in err and ("restore" in err or "delete" in err)
    if name == "config.json":
        assert predict.main(["--run", str(copy_of), *QUICK]) == 2
        assert f"{copy_of / name} is damaged" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("field, value, named", [("num_embeddings", "many", '"num_embeddings" is \'many\''),
                                                ("prior_layers", 2.5, '"prior_layers" is 2.5'),
                                                ("downsample", 3, "--downsample must be a power of two")])
@pytest.mark.slow  # trains a run
def test_a_config_edited_to_a_wrong_type_or_range_is_named_where_the_run_is_opened(copy_of, capsys, field, value,
                                                                                  named):
    config = json.loads((copy_of / "config.json").read_text())
    (copy_of / "config.json").write_text(json.dumps({**config, field: value}))
    before = {p.name: p.read_bytes() for p in copy_of.iterdir() if p.is_file()}
    for main in (lambda: predict.main(["--run", str(copy_of), *QUICK]), lambda: train.main(["--resume", str(copy_of)])):
        assert main() == 2
        err = one_line(capsys.readouterr().err)
        assert f"{copy_of / 'config.json'} has a setting no run can have" in err and named in err, err
    assert {p.name: p.read_bytes() for p in copy_of.iterdir() if p.is_file()} == before  # nothing re-encoded


@pytest.mark.slow  # trains a run
def test_a_damaged_metrics_file_is_kept_aside_and_begun_anew(copy_of, capsys):
    (copy_of / "metrics.json").write_text("{not json")
    assert predict.main(["--run", str(copy_of), *QUICK]) == 0
    assert "was damaged; kept as metrics.json.damaged" in capsys.readouterr().out
    assert (copy_of / "metrics.json.damaged").read_text() == "{not json"
    assert {"reconstruction", "samples"} <= set(json.loads((copy_of / "metrics.json").read_text()))


@pytest.mark.slow  # trains a run
@pytest.mark.parametrize("damage", ["wrong shape", "truncated"])
def test_a_damaged_code_cache_is_encoded_again(copy_of, capsys, damage):
    cache = copy_of / "codes_train.npz"
    if damage == "wrong shape":
        np.savez(cache, codes=np.zeros((5, 3, 3), "int16"))
    else:
        cache.write_bytes(cache.read_bytes()[:100])
    assert train.main(["--resume", str(copy_of), "--stage", "prior", "--retrain"]) == 0
    assert f"the code cache {cache} is damaged" in capsys.readouterr().out
    codes, positions = Run.open(copy_of).read_codes("train")
    assert codes.shape == (64, 8, 8) and positions.shape == (64,)


# ---------------------------------------------------------------------------------------------------------------
# Odd data folders
# ---------------------------------------------------------------------------------------------------------------


def test_stray_files_are_skipped_with_a_note_and_upper_case_png_is_read(tmp_path, capsys):
    for split, n in [("train", 4), ("validate", 2)]:
        for i in range(n):
            write_png(tmp_path / "data" / split / f"case_{i:03d}_slice_0.nii.png", brainish(32, seed=i))
        write_png(tmp_path / "data" / split / "CASE_009_SLICE_0.NII.PNG", brainish(32, seed=9))
        (tmp_path / "data" / split / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (tmp_path / "data" / split / "README.txt").write_text("slices from OASIS")
        (tmp_path / "data" / split / "._case_000_slice_0.nii.png").write_bytes(b"\0\5\26\7 AppleDouble")
    args = ["--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"), "--name", "odd",
            "--stage", "vqvae", "--epochs", "1", *TINY]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "data: 5 train / 3 validation slices" in out  # the upper-case .PNG among them
    assert out.count("note: skipped 3 file(s)") == 2 and ".DS_Store" in out and "README.txt" in out


def test_a_data_dir_that_is_a_file_gets_one_line(tmp_path, capsys):
    (tmp_path / "slices.zip").write_bytes(b"PK")
    assert train.main(["--data-dir", str(tmp_path / "slices.zip"), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "is a file, not a folder" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# An output folder that cannot be written
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_says_at_once_when_it_cannot_write_and_writes_to_out(trained, demo_dir):
    shared = Path(tempfile.mkdtemp(prefix="shared-results-"))  # outside pytest's owner-only folders
    try:
        os.chmod(shared, 0o755)
        run, data = shared / "run", shared / "data"
        shutil.copytree(trained, run)
        shutil.copytree(demo_dir, data)
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        os.chmod(run, 0o555)  # a read-only run folder
        out = shared / "mine"
        out.mkdir(mode=0o777)
        os.chmod(out, 0o777)
        command = [sys.executable, str(ROOT / "predict.py"), "--run", str(run), "--data-dir", str(data), *QUICK]
        if os.geteuid() == 0:  # root writes through permission bits: check as an ordinary user
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        env = {**os.environ, "HOME": str(out), "MPLCONFIGDIR": str(out / ".matplotlib")}
        refused = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert refused.returncode == 2, refused.stderr[-2000:]
        err = one_line(refused.stderr)
        assert f"cannot write the figures, samples and metrics into {run}" in err and "--out DIR" in err
        assert "reconstruction" not in refused.stdout  # said before any evaluation

        written = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300,
                                 env=env)
        assert written.returncode == 0, written.stderr[-2000:]
        assert {"metrics.json", "samples.png", "recon_test.png"} <= {p.name for p in out.iterdir()}
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    finally:
        os.chmod(shared / "run", 0o755) if (shared / "run").exists() else None
        shutil.rmtree(shared, ignore_errors=True)
