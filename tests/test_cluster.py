"""Training on several workers (cluster.py, train.py --multi-worker): the shard arithmetic in-process; then two worker
processes on 127.0.0.1, on each backend: each reads its own shard, both end with the weights one process gets from
the same global batches, only the chief writes the run folder, and a killed worker stops the other with one line and
the run resumes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dataset
from cluster import Cluster
from conftest import ROOT, TINY
from run_state import Config, Run
from utils import UserError

pytestmark = pytest.mark.serial  # two worker processes that meet over sockets and heartbeats: CI runs them alone

WORKERS = 2
TIMEOUT = 300  # seconds any worker process may take


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic of shards, in one process
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [64, 65, 67])
def test_shards_are_disjoint_cover_the_split_and_give_every_worker_as_many_full_batches(total):
    items = np.arange(total)
    workers = [Cluster(3, index) for index in range(3)]
    shards = [worker.shard(items) for worker in workers]
    assert sorted(np.concatenate(shards)) == list(items)
    assert len({worker.steps(total, 12) for worker in workers}) == 1
    sizes = {worker.epoch_size(total, 12) for worker in workers}
    assert sizes == {workers[0].steps(total, 12) * 4} and min(map(len, shards)) >= sizes.pop()
    assert Cluster().steps(total, 12) == -(-total // 12) and Cluster().epoch_size(total, 12) is None


def test_a_global_batch_that_does_not_split_over_the_workers_or_fill_a_step_is_refused():
    with pytest.raises(UserError, match="does not split evenly over the 2 replicas"):
        Cluster(2, 0).check_batch("--batch-size", 15, 100, "train")
    with pytest.raises(UserError, match="cannot fill one step"):
        Cluster(2, 0).check_batch("--batch-size", 64, 60, "train")
    Cluster(2, 0).check_batch("--batch-size", 16, 32, "train")


def test_an_epoch_of_a_worker_takes_its_epoch_size_in_full_batches_and_others_sit_out_each_epoch(demo_dir):
    files = dataset.split_files(demo_dir, "train")[:21]
    batches = dataset.make_dataset(files, 32, 4, shuffle=True, seed=0, epoch_size=16)
    epochs = [np.concatenate([x.numpy()[:, 16, 16, 0] for x, _ in batches]) for _ in range(3)]
    assert all(len(e) == 16 for e in epochs) and all(x.shape[0] == 4 for x, _ in batches)
    assert len({tuple(np.sort(e)) for e in epochs}) > 1  # another 16 of the 21 each epoch


def test_a_read_only_run_writes_nothing(tmp_path):
    run = Run(tmp_path / "run", read_only=True)
    with run.training(Config(), ("vqvae",)):
        run.write_config(Config())
        run.update_metrics("vqvae", {"x": 1})
        run.write_codes("train", np.zeros((1, 2, 2), np.int16), None)
        run.stage("vqvae").write_history({"loss": [1.0]})
        run.stage("vqvae").save_checkpoint(None, epochs_done=1)
        run.stage("vqvae").mark_finished()
        run.discard_stages_from("vqvae")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# Two worker processes on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port with two free ones above it (TensorFlow's second worker, and the watch)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65000 and all(port_free(port + i) for i in (1, 2)):
            return port
    raise RuntimeError("no free ports")


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def worker_env(backend: str, index: int, port: int) -> dict:
    """The environment that names a two-worker cluster on 127.0.0.1 to worker `index`."""
    env = {**os.environ, "KERAS_BACKEND": backend}
    if backend == "jax":
        env.update(KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}", KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                   KERAS_DISTRIBUTION_PROCESS_ID=str(index))
    else:
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]},
                                       "task": {"type": "worker", "index": index}})
    return env


def start_workers(backend: str, args_of, logs: Path) -> list[subprocess.Popen]:
    """Both workers, each with args_of(index) after `python`, their output in logs/out_I and logs/err_I."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return [subprocess.Popen([sys.executable, *args_of(index)], env=worker_env(backend, index, port), cwd=ROOT,
                             stdout=open(logs / f"out_{index}", "w"), stderr=open(logs / f"err_{index}", "w"))
            for index in range(WORKERS)]


def finish(workers: list[subprocess.Popen], logs: Path, timeout: float = TIMEOUT) -> None:
    """Waits for both workers (killing them after `timeout`) and asserts that both succeeded."""
    deadline = time.time() + timeout
    for worker in workers:
        try:
            worker.wait(max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            pytest.fail(f"the workers did not finish in {timeout} s; worker 0 said:\n{tail(logs / 'err_0')}")
    for index, worker in enumerate(workers):
        assert worker.returncode == 0, tail(logs / f"err_{index}")


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:])


BACKENDS = ["tensorflow", "jax"]  # JAX's processes meet over gloo, its CPU collectives


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_workers_read_disjoint_shards_and_end_with_the_weights_of_one_process_on_their_global_batches(
        backend, demo_dir, tmp_path):
    script = str(ROOT / "tests" / "cluster_worker.py")
    finish(start_workers(backend, lambda i: [script, str(demo_dir), str(tmp_path), "--multi-worker"], tmp_path),
           tmp_path)
    single = subprocess.run([sys.executable, script, str(demo_dir), str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "KERAS_BACKEND": backend}, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr[-3000:]
    workers = [np.load(tmp_path / f"worker_{i}.npz") for i in range(WORKERS)]
    replay = np.load(tmp_path / "single.npz")

    for key, examples, global_batch in (("vqvae_batches", 64, 16), ("prior_batches", 40, 8)):
        seen = [w[key] for w in workers]  # (steps, local batch) example indices of each worker
        assert seen[0].shape == seen[1].shape and seen[0].shape[1] * WORKERS == global_batch
        everything = np.concatenate([s.ravel() for s in seen])
        assert len(set(everything)) == len(everything), "an example was read twice in the epoch"
        assert set(seen[0].ravel()).isdisjoint(seen[1].ravel()) and everything.max() < examples
        assert len(everything) > examples - global_batch - WORKERS  # at most a batch and a worker's rest sit out
    weights = [k for k in replay.files if k.startswith(("vqvae_", "prior_"))]
    assert len(weights) > 20
    for key in weights:
        np.testing.assert_array_equal(workers[0][key], workers[1][key], err_msg=key)
        np.testing.assert_allclose(workers[0][key], replay[key], atol=1e-6, err_msg=key)


def train_args(runs: Path, demo_dir, *extra) -> list[str]:
    return [str(ROOT / "train.py"), "--multi-worker", "--data-dir", str(demo_dir), "--runs-dir", str(runs),
            "--name", "mw", *TINY, "--epochs", "2", "--prior-epochs", "2", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_py_on_two_workers_trains_every_stage_and_only_the_chief_writes_the_run(backend, demo_dir, tmp_path):
    runs, audit = tmp_path / "runs", tmp_path / "worker_1_writes.txt"

    def args_of(index):  # the VQ-VAE's last epoch sharpens its decoder alone (codes frozen)
        args = train_args(runs, demo_dir, "--epochs", "3", "--sharpen-epochs", "1", "--spectral-loss", "0.1")
        if index == 0:
            return args
        return [str(ROOT / "tests" / "cluster_worker.py"), "--audit", str(runs), str(audit), *args[1:]]

    finish(start_workers(backend, args_of, tmp_path), tmp_path)
    run = runs / "mw"
    progress = json.loads((run / "progress.json").read_text())
    assert all(progress[stage]["finished"] for stage in ("vqvae", "prior", "segmenter"))
    assert {"vqvae.keras", "prior.keras", "segmenter.keras", "metrics.json", "codes_train.npz"} <= \
        {p.name for p in run.iterdir()}
    assert audit.exists() and audit.read_text() == "", f"worker 1 wrote into the run folder: {audit.read_text()}"
    for index in range(WORKERS):
        out = (tmp_path / f"out_{index}").read_text()
        assert f"worker {index} of 2" in out and "encoded the train split by 2 workers" in out
        assert "sharpening the decoder: epochs 3-3" in out
    history = (run / "history.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in history[1:]] == [1, 2, 3]

    # the code grids the workers encoded a shard each are the whole split's, in order, as one process encodes them
    import keras

    if keras.backend.backend() == backend:
        import train

        vqvae = Run(run).stage("vqvae").load_model()
        assert vqvae.codes_frozen
        files = dataset.split_files(demo_dir, "train")
        expected = train.utils.batched(vqvae.encode, dataset.load_images(files, 32))
        np.testing.assert_array_equal(np.load(run / "codes_train.npz")["codes"], expected)


@pytest.mark.slow
def test_a_killed_worker_stops_the_other_with_one_line_and_the_run_resumes_on_two_workers(demo_dir, tmp_path):
    runs, backend = tmp_path / "runs", "tensorflow"
    run = runs / "mw"
    workers = start_workers(backend, lambda i: train_args(runs, demo_dir, "--prior-epochs", "12"), tmp_path / "a")
    deadline = time.time() + TIMEOUT
    while json.loads((run / "progress.json").read_text() if (run / "progress.json").exists() else "{}").get(
            "prior", {}).get("epochs_done", 0) < 2:
        assert all(w.poll() is None for w in workers), tail(tmp_path / "a" / "err_0")
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)
    workers[1].send_signal(signal.SIGKILL)  # mid-epoch of the prior
    try:
        workers[0].wait(60)  # the chief stops in seconds, not at an engine's timeout
    except subprocess.TimeoutExpired:
        workers[0].kill()
        pytest.fail("the chief went on waiting for the killed worker")
    assert workers[0].returncode != 0
    err = (tmp_path / "a" / "err_0").read_text()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert "worker 1 of 2 stopped" in errors[0] and f"--resume {run} --multi-worker" in errors[0]
    kept = json.loads((run / "progress.json").read_text())["prior"]["epochs_done"]
    assert kept >= 2

    finish(start_workers(backend, lambda i: [str(ROOT / "train.py"), "--resume", str(run), "--multi-worker"],
                         tmp_path / "b"), tmp_path / "b")
    assert f"resuming the prior after epoch {kept} of 12" in (tmp_path / "b" / "out_0").read_text()
    progress = json.loads((run / "progress.json").read_text())
    assert progress["prior"] == {"epochs_done": 12, "finished": True} and progress["segmenter"]["finished"]
    history = (run / "prior_history.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in history[1:]] == list(range(1, 13))
