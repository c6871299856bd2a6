"""Workers of tests/test_cluster.py.

    python tests/cluster_worker.py DATA OUT [--multi-worker]
trains one epoch of a tiny VQ-VAE on its shard of a demo set's training slices and one of a tiny prior on its shard of
code grids, through train.py's own pieces, and saves what it saw and what it learned. With --multi-worker it is one
worker of the cluster its environment names (TF_CONFIG, or KERAS_DISTRIBUTION_*) and saves OUT/worker_I.npz: the
training examples of each of its batches (as indices into the split) and the weights after the epoch. Without, it
replays the global batches those workers saw, in one process, and saves OUT/single.npz.

    python tests/cluster_worker.py --audit FOLDER LOG TRAIN-ARGS...
runs train.py with TRAIN-ARGS and lists in LOG every file it opened for writing, made, renamed or removed in FOLDER.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402

import dataset  # noqa: E402
import run_state  # noqa: E402
import train  # noqa: E402

TINY = dict(image_size=32, hidden_channels=8, num_res_blocks=1, num_embeddings=16, embedding_dim=4, batch_size=16,
            prior_channels=8, prior_layers=2, prior_kernel_size=3, prior_batch_size=8, prior_augment=0,
            prior_layout_levels=0, prior_position_frequencies=0, epochs=1, prior_epochs=1, seed=3)
GRIDS = 40  # random code grids for the prior: 40 over 2 workers at 8 a step is 2 steps, and 4 grids sit out


def main() -> None:
    if sys.argv[1] == "--audit":
        return audit(Path(sys.argv[2]).resolve(), Path(sys.argv[3]), sys.argv[4:])
    data, out, multi = sys.argv[1], Path(sys.argv[2]), "--multi-worker" in sys.argv
    config = dataclasses.replace(run_state.Config(**TINY), data_dir=data)
    hardware = train.setup_hardware(train.parse_args(["--multi-worker", "--name", "x"] if multi else []))
    cluster = hardware.cluster
    files = dataset.split_files(data, "train")
    images = dataset.load_images(files, config.image_size)
    grid = (GRIDS, config.grid_size, config.grid_size)
    codes = np.random.default_rng(0).integers(0, config.num_embeddings, grid).astype("int32")
    stage = run_state.Run(out / "no-run").stage  # a run that was never made: new models, from the seed

    if multi:
        def pipelines():
            return (dataset.make_dataset(cluster.shard(files), config.image_size,
                                         cluster.local_batch(config.batch_size), shuffle=False,
                                         epoch_size=cluster.epoch_size(len(files), config.batch_size)),
                    train.local_batches(cluster, (codes, codes), config.prior_batch_size))

        # the batches of the epoch it trains, unshuffled: Keras may take a batch of a pass of its own before the epoch
        record = pipelines()
        seen = {"vqvae_batches": batch_indices(record[0], images), "prior_batches": batch_indices(record[1], codes)}
        pixels, grids = pipelines()
    else:  # the global batches of the workers' files: each worker's batch k, side by side
        seen = [np.load(out / f"worker_{i}.npz") for i in range(2)]
        pixels = dataset.array_dataset(*(stack(images, seen, "vqvae_batches"),) * 2, config.batch_size)
        grids = dataset.array_dataset(*(stack(codes, seen, "prior_batches"),) * 2, config.prior_batch_size)

    steps = cluster.steps(len(files), config.batch_size)
    vqvae = train.stage_model(stage("vqvae"), 1, hardware, config.seed,
                              lambda dtype, jit: train.modules.new_vqvae(config, steps, dtype, jit))
    vqvae.fit(hardware.distribute(pixels), epochs=1, verbose=0, shuffle=False)
    prior_steps = cluster.steps(GRIDS, config.prior_batch_size)
    prior = train.stage_model(stage("prior"), 1, hardware, config.seed,
                              lambda dtype, jit: train.modules.new_prior(config, prior_steps, dtype, jit))
    prior.fit(hardware.distribute(grids), epochs=1, verbose=0, shuffle=False)

    results = {f"vqvae_{i}": w for i, w in enumerate(vqvae.get_weights())}
    results.update({f"prior_{i}": w for i, w in enumerate(prior.get_weights())})
    if multi:
        np.savez(out / f"worker_{cluster.index}.npz", **results, **seen)
    else:
        np.savez(out / "single.npz", **results)
    cluster.barrier()
    cluster.leave()


def batch_indices(batches, examples: np.ndarray) -> np.ndarray:
    """(steps, batch) indices into `examples` of each batch's rows."""
    flat = examples.reshape(len(examples), -1)
    return np.stack([[int(np.flatnonzero((flat == row).all(axis=1))[0]) for row in np.asarray(x).reshape(len(x), -1)]
                     for x, _ in batches.as_numpy_iterator()])


def stack(examples: np.ndarray, seen: list, key: str) -> np.ndarray:
    """The rows of every global batch in order: batch k of worker 0, then of worker 1, for each k."""
    return np.concatenate([examples[w[key][k]] for k in range(len(seen[0][key])) for w in seen])


WRITING_EVENTS = {"os.rename", "os.replace", "os.remove", "os.unlink", "os.mkdir", "os.rmdir", "shutil.rmtree",
                  "os.chmod", "os.truncate", "os.link", "os.symlink", "shutil.move", "shutil.copyfile"}


def audit(folder: Path, log: Path, argv: list) -> None:
    """train.main(argv), with an audit hook that notes every write into `folder` (Python's own file operations:
    Keras, NumPy and matplotlib write through them); the notes go to `log` when the process ends."""
    import atexit

    writes = []

    def note(path) -> None:
        try:
            if Path(os.fsdecode(path)).resolve().is_relative_to(folder):
                writes.append(os.fsdecode(path))
        except (TypeError, ValueError):
            pass  # a file descriptor, not a path

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            if (mode and set(mode) & set("wax+")) or (not mode and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                note(path)
        elif event in WRITING_EVENTS:
            for path in args[:2]:
                note(path)

    atexit.register(lambda: log.write_text("\n".join(writes)))
    sys.addaudithook(hook)
    sys.exit(train.main(argv))


if __name__ == "__main__":
    main()
