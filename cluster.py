"""Several machines: which worker of a cluster this process is, and the engine that joins the workers.

    python train.py --multi-worker ...    # on every worker, with the cluster named by the environment:
      TensorFlow (the default backend): tf.distribute.MultiWorkerMirroredStrategy, the cluster from TF_CONFIG, or
        from Slurm's variables (SLURM_*, through SlurmClusterResolver) when TF_CONFIG is not set;
      JAX (KERAS_BACKEND=jax): keras.distribution.initialize() (jax.distributed: the coordinator address, process
        count and id from KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID, or found under Slurm) with
        keras.distribution.DataParallel.

Data-parallel, synchronous: every worker holds the whole model, reads its own shard of the data (the files i, i + n,
i + 2n, ... of the split for worker i of n), and every step averages the gradients of the global batch. Worker 0, the
chief, writes the run folder; the others read it (on a filesystem all workers share) and write nothing there.

A watch (one TCP connection from every worker to the chief, on the JAX coordinator's port + 1, or TensorFlow's highest
worker port + 1) stops the others with one line when a worker dies: the engines' own detectors take minutes and end
in a C++ stack trace, or wait for the collective's timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time

import numpy as np

from utils import WRITING, UserError

WATCH_CONNECT_SECONDS = 300  # how long a worker waits for the chief's watch to listen (the chief may start later)
COLLECTIVE_TIMEOUT_SECONDS = 600  # TensorFlow: a collective (a gradient all-reduce) that waits longer fails


@dataclasses.dataclass
class Cluster:
    """This process's place among `workers` processes; Cluster() is the single process of a plain run."""

    workers: int = 1
    index: int = 0
    backend: str = ""
    strategy: object = None  # TensorFlow: the MultiWorkerMirroredStrategy
    local_replicas: int = 1  # TensorFlow: the replicas (GPUs) of each worker; JAX: 1, a process takes one batch
    hint: str = ""  # what the watch's line adds: the command that continues the run
    _peers: list = dataclasses.field(default_factory=list, repr=False)  # the watch's connections

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    @property
    def multi(self) -> bool:
        return self.workers > 1

    def describe(self) -> str:
        return f"worker {self.index} of {self.workers}{' (chief)' * self.is_chief}" if self.multi else ""

    # data -------------------------------------------------------------------------------------------------------
    def shard(self, items):
        """This worker's shard of a split's files or arrays: every workers-th item from its index. The shards are
        disjoint and cover the split."""
        return items[self.index::self.workers]

    def local_batch(self, global_batch: int) -> int:
        """The batch this worker's input pipeline yields: the global batch's share of one replica (TensorFlow: one
        per GPU of the worker) or of one process (JAX, which splits it over the process's devices itself)."""
        return global_batch // (self.workers * self.local_replicas)

    def steps(self, total: int, global_batch: int) -> int:
        """Steps per epoch over a split of `total` examples at the global batch size. Several workers take only full
        batches, as many on each: a collective step needs all of them (see epoch_size)."""
        if not self.multi:
            return int(np.ceil(total / global_batch))
        return (total // self.workers) // (self.local_batch(global_batch) * self.local_replicas)

    def epoch_size(self, total: int, global_batch: int) -> int | None:
        """How many examples of its shard a worker takes each epoch, after its shuffle: `steps` full batches, so up
        to global_batch - 1 + workers - 1 examples of the split sit out an epoch (others each epoch when shuffled).
        None in a single process: all of them, the last batch partial."""
        if not self.multi:
            return None
        return self.steps(total, global_batch) * self.local_batch(global_batch) * self.local_replicas

    def check_batch(self, flag: str, global_batch: int, total: int, split: str) -> None:
        """A UserError unless the global batch splits evenly over the replicas and the split fills a step."""
        if not self.multi:
            return
        replicas = self.workers * self.local_replicas
        if global_batch % replicas:
            raise UserError(f"{flag} {global_batch} does not split evenly over the {replicas} replicas of {self.workers} "
                            f"workers; pass a multiple of {replicas} (it is the global batch, shared by them)")
        if not self.steps(total, global_batch):
            raise UserError(f"the {split} split ({total} examples) cannot fill one step of {flag} {global_batch} on "
                            f"{self.workers} workers; pass a smaller batch")

    # synchronisation ----------------------------------------------------------------------------------------------
    def barrier(self) -> None:
        """Returns once every worker has reached it: what the chief wrote before it, the others may read after."""
        if not self.multi:
            return
        if self.backend == "jax":
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("train.py barrier")
        else:
            self._tf_all_gather(np.zeros((1,), np.int32))

    def gather(self, local: np.ndarray, total: int) -> np.ndarray:
        """The arrays of every worker's shard, put back into the split's order (the inverse of shard): the local
        array holds the rows index, index + workers, ... of `total` rows."""
        if not self.multi:
            return local
        rows = -(-total // self.workers)  # the longest shard; shorter ones are padded to it
        padded = np.zeros((rows, *local.shape[1:]), local.dtype)
        padded[:len(local)] = local
        if self.backend == "jax":
            from jax.experimental import multihost_utils

            shards = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
        else:
            shards = self._tf_all_gather(padded)
        whole = np.zeros((total, *local.shape[1:]), local.dtype)
        for worker in range(self.workers):
            whole[worker::self.workers] = shards[worker][:len(range(worker, total, self.workers))]
        return whole

    def pad_shard(self, local: np.ndarray, total: int) -> np.ndarray:
        """The shard padded (with copies of its last row) to the longest shard's length: every worker then runs
        the same computations in the same order, as the engines need of a model shared by all of them."""
        rows = -(-total // self.workers)
        return np.concatenate([local, np.repeat(local[-1:], rows - len(local), axis=0)]) if len(local) < rows \
            else local

    def _tf_all_gather(self, array: np.ndarray) -> np.ndarray:
        """(workers, *array.shape): every worker's array, through the strategy's collectives (the first local
        replica of each worker contributes its array; a worker with several GPUs has several replicas)."""
        import tensorflow as tf

        wide = array.astype(np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32)  # what it gathers
        value = self.strategy.experimental_distribute_values_from_function(lambda context: tf.constant(wide)[None])
        gathered = self.strategy.gather(value, axis=0).numpy()  # (replicas, *shape), worker by worker
        return gathered[::self.local_replicas].astype(array.dtype)

    # the watch ----------------------------------------------------------------------------------------------------
    def watch(self, chief_host: str, port: int) -> None:
        """Starts the watch: the chief listens on `port` for the other workers' connections; when one of them
        closes without saying goodbye (its process died), every worker still running prints one line and exits 1."""
        if self.is_chief:
            server = socket.create_server(("", port), reuse_port=False)
            threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        else:
            deadline = time.time() + WATCH_CONNECT_SECONDS
            while True:
                try:
                    peer = socket.create_connection((chief_host, port), timeout=5)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise UserError(f"worker {self.index} could not reach the chief's watch at {chief_host}:{port} "
                                        f"in {WATCH_CONNECT_SECONDS} s; start worker 0 too, and let port {port} "
                                        "through between the machines") from None
                    time.sleep(0.5)
            peer.settimeout(None)
            peer.sendall(f"{self.index}\n".encode())
            self._listen(peer, 0)

    def _accept(self, server: socket.socket) -> None:
        for _ in range(self.workers - 1):
            peer, _ = server.accept()
            index = int(peer.makefile().readline() or -1)
            self._listen(peer, index)

    def _listen(self, peer: socket.socket, index: int) -> None:
        self._peers.append(peer)
        threading.Thread(target=self._wait_for_goodbye, args=(peer, index), daemon=True).start()

    def _wait_for_goodbye(self, peer: socket.socket, index: int) -> None:
        try:
            said = peer.recv(16)
        except OSError:
            said = b""
        if said.startswith(b"bye"):
            return
        who = "the chief (worker 0)" if index == 0 else f"worker {index}"
        with WRITING:  # not in the middle of a checkpoint and the epoch count that vouches for it
            print(f"error: {who} of {self.workers} stopped before the training ended (its own log may say why), so worker "
                  f"{self.index} stops too; the epochs saved so far are kept{self.hint}", file=sys.stderr, flush=True)
            os._exit(1)

    def leave(self) -> None:
        """Says goodbye to the watched peers: this worker ends on purpose (done, or with an error of its own)."""
        for peer in self._peers:
            try:
                peer.sendall(b"bye")
            except OSError:
                pass


@contextlib.contextmanager
def alone():
    """Around what one worker does on its own (the chief writing a checkpoint). Keras makes variables there too (its
    saving builds a reference optimizer), which under JAX's DataParallel is a step every process must take; here
    they are this process's own."""
    import keras

    shared = keras.distribution.distribution() if keras.backend.backend() == "jax" else None
    if shared is None:
        yield
        return
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(shared)


# ---------------------------------------------------------------------------------------------------------------
# Joining a cluster
# ---------------------------------------------------------------------------------------------------------------


def join(backend: str) -> Cluster:
    """Connects this process to the cluster the environment names, with the backend's engine; starts the watch."""
    cluster, chief_host, port = _join_jax() if backend == "jax" else _join_tensorflow()
    cluster.watch(chief_host, port)
    return cluster


def _join_jax() -> tuple[Cluster, str, int]:
    import jax
    import keras

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # processes on CPUs (GPUs use NCCL)
    try:
        keras.distribution.initialize()
    except (ValueError, RuntimeError) as error:
        raise UserError(f"--multi-worker found no cluster to join ({str(error).splitlines()[0]}); set "
                        "KERAS_DISTRIBUTION_JOB_ADDRESSES (the coordinator's host:port first), "
                        "KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID on every worker, or start "
                        "the workers with srun under Slurm") from None
    keras.distribution.set_distribution(keras.distribution.DataParallel(auto_shard_dataset=False))
    from jax._src import distributed  # where jax.distributed keeps the coordinator it joined

    host, port = distributed.global_state.coordinator_address.rsplit(":", 1)
    return Cluster(jax.process_count(), jax.process_index(), "jax"), host, int(port) + 1


def _join_tensorflow() -> tuple[Cluster, str, int]:
    import tensorflow as tf

    if "TF_CONFIG" in os.environ:
        try:
            task = json.loads(os.environ["TF_CONFIG"])["task"]
        except (ValueError, KeyError, TypeError):
            raise UserError('TF_CONFIG is not of the form {"cluster": {"worker": ["host:port", ...]}, "task": '
                            '{"type": "worker", "index": I}}; correct it on this worker') from None
        if task.get("type") != "worker":
            raise UserError(f"TF_CONFIG names this task a {task.get('type')!r}; --multi-worker trains on workers "
                            '(the first is the chief): give every task "type": "worker"')
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    elif "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
    else:
        raise UserError("--multi-worker found no cluster to join: set TF_CONFIG on every worker, or start the "
                        "workers with srun under Slurm")
    workers = resolver.cluster_spec().as_dict().get("worker", [])
    if len(workers) < 2:
        raise UserError(f"the cluster has {len(workers)} worker(s); --multi-worker needs 2 or more (a single machine "
                        "trains without it)")
    tf.get_logger().setLevel("ERROR")  # each barrier and gather would warn that it traces a function again
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
    _patch_keras_for_multi_worker()
    host = workers[0].rsplit(":", 1)[0]
    port = max(int(address.rsplit(":", 1)[1]) for address in workers) + 1  # above every worker's own port
    cluster = Cluster(len(workers), resolver.task_id, "tensorflow", strategy,
                      strategy.num_replicas_in_sync // len(workers))
    return cluster, host, port


def _patch_keras_for_multi_worker() -> None:
    """Keras 3's TensorFlow trainer fails under MultiWorkerMirroredStrategy (keras-team/keras#20585, open at Keras
    3.15): it all-reduces a batch of (inputs, targets) to learn their shapes, which the strategy cannot do for a
    tuple, and averages the logged scalars over an axis 0 they do not have. Both only in multi-worker mode; both
    replaced here by what they mean: the shapes of the local batch, and the mean over the workers."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_multi_worker_patched", False):
        return
    reduce_per_replica = trainer.reduce_per_replica

    def symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(lambda v: self.distribute_strategy.experimental_local_results(v)[0],
                                                   next(batches))
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None)
                                         if isinstance(v, tf.distribute.DistributedValues) else v, values)
        return reduce_per_replica(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = symbolic_build
    trainer.reduce_per_replica = reduce
    trainer._multi_worker_patched = True
