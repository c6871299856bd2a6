"""Trains the VQ-VAE, then its PixelCNN prior, on brain MRI slices, into a run folder runs/NAME.

    python train.py --demo                       # builds the demo set into data/demo, trains CPU-sized models
    python train.py --data-dir PATH/TO/OASIS     # the OASIS preset (256 px), meant for a GPU
    python train.py --demo --stage vqvae         # stage 1 only

    python train.py --resume runs/NAME                    # continue a run where it stopped (crash, kill, Ctrl-C)
    python train.py --resume runs/NAME --stage prior      # train the prior of a run whose VQ-VAE is trained
    python train.py --resume runs/NAME --stage prior --retrain --prior-layers 12   # train its prior again

Stage 1 trains the VQ-VAE on the images. Stage 2 encodes the train and validation splits into code grids once and
trains the PixelCNN prior on them. Each stage saves a checkpoint after every epoch (run_state.Run lists the files).

Hardware (not part of the run's settings; a resumed run may change it): --devices N trains on N GPUs with
MirroredStrategy (default: every visible GPU); --mixed-precision computes in bfloat16/float16 with the quantizer,
losses and outputs in float32 (default: on with a GPU); --xla compiles the training step with XLA (default: on with
one GPU, off on CPU, where it measured slower: benchmarks/train_throughput.py); --multi-worker trains on several
machines, the same command on each (cluster.py; README "Several machines").
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads: none of its C++ log lines

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

import utils

with utils.native_stderr_captured() as TENSORFLOW_STARTUP:  # its start-up lines, shown only when they explain
    import keras  # something (a GPU driver that TensorFlow cannot use); see setup_hardware

import cluster as cluster_lib
import dataset
import modules
import realism
import run_state
from cluster import Cluster
from run_state import Config, Run
from utils import UserError

STAGES = {"all": run_state.STAGES, "vqvae": ("vqvae",), "prior": ("prior",), "segmenter": ("segmenter",)}  # --stage
PRIOR_SETTINGS = {f.name for f in dataclasses.fields(Config) if f.name.startswith("prior_")}
SEGMENTER_SETTINGS = {f.name for f in dataclasses.fields(Config) if f.name.startswith("segmenter_")}


def main(argv: list[str] | None = None) -> int:
    return utils.script_main(train, argv)


def train(argv: list[str] | None = None) -> Path:
    """The method: flags -> hardware -> the run folder (a new one, or --resume) -> stage 1 -> stage 2."""
    args = parse_args(argv)
    hardware = setup_hardware(args)  # first: splitting the CPU into logical devices must precede any TF work
    run, config, stages = open_run(args, hardware.cluster)
    hardware.check_batches(config)
    print(f"hardware: {hardware.describe()}")
    vqvae_to_train = "vqvae" in stages and (args.retrain or not run.stage("vqvae").finished)
    hardware.cluster.barrier()  # every worker has read the run's state before the chief changes it
    seed_everything(config.seed)  # before the data pipeline: tf.data's shuffle takes TensorFlow's global seed
    hardware.cluster.hint = resume_hint(run, hardware.cluster)
    data = load_training_images(config, args.demo, hardware) if vqvae_to_train else None  # data errors: before any
    try:                                                                                     # folder is made
        # run.training makes a new run's folder (one process per run); a stop signal inside stops at a safe point
        with run.training(config, stages, wait=args.wait), utils.stops_at_safe_points():
            if "vqvae" in stages:
                train_vqvae(run, config, hardware, data, retrain=args.retrain)
            if "prior" in stages:
                train_prior(run, config, hardware, retrain=args.retrain and stages == ("prior",))
            if "segmenter" in stages:
                train_segmenter(run, config, hardware, retrain=args.retrain and stages == ("segmenter",))
            hardware.cluster.barrier()  # the chief's last writes are done: now every worker may end
    except utils.Interrupted as stop:
        raise utils.Interrupted(stop.signal_number, f"{safe_on_disk(run, config)}{resume_hint(run)}") from None
    except utils.DiskFull as error:
        raise utils.DiskFull(f"{error}{resume_hint(run)}") from None
    hardware.cluster.leave()
    print(f"run folder: {run.path}")
    return run.path


def safe_on_disk(run: Run, config: Config) -> str:
    """What an interrupted command leaves: the last completed epoch of each stage."""
    epochs = {"vqvae": config.epochs, "prior": config.prior_epochs, "segmenter": config.segmenter_epochs}
    done = [f"the {STAGE_LABELS[name]}'s epoch {run.stage(name).epochs_done} of {epochs[name]}"
            for name in run_state.STAGES if run.exists() and run.stage(name).epochs_done]
    if not done:
        return "no epoch had finished, nothing was kept"
    return " and ".join(done) + (" is" if len(done) == 1 else " are") + " safe on disk"


def resume_hint(run: Run, cluster: Cluster | None = None) -> str:
    if cluster is not None and cluster.multi:  # the folder may not exist yet: it will by the time a worker dies
        return f"; continue with `python train.py --resume {run.path} --multi-worker` on every worker"
    return f"; continue with `python train.py --resume {run.path}`" if run.exists() else ""


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

PRECISIONS = ("auto", "off", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--demo", action="store_true",
                        help="use the built-in demo set (built into data/demo if missing) and the CPU preset")
    parser.add_argument("--stage", choices=STAGES,
                        help="all: the VQ-VAE, the prior, then the tissue segmenter (default for a new run); vqvae: "
                             "stage 1 only; prior, segmenter: that stage of the --resume run")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue the run folder RUN with its own settings, from its last completed epoch")
    parser.add_argument("--retrain", action="store_true",
                        help="with --resume RUN --stage prior: train the prior again from scratch (its --prior-* "
                             "settings may change); with --stage vqvae: the VQ-VAE (its prior is discarded)")
    parser.add_argument("--wait", action="store_true",
                        help="if another process is training the same run, wait for it to end, then continue")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # the old way to name a run; says what to type instead
    hardware = parser.add_argument_group("hardware (not saved with the run)")
    hardware.add_argument("--devices", type=int, metavar="N",
                          help="replicas for MirroredStrategy: the first N GPUs (default: all visible); on a machine "
                               "without GPUs, N > 1 splits the CPU into N logical devices (for testing)")
    hardware.add_argument("--mixed-precision", choices=PRECISIONS, default="auto",
                          help="auto (default): bfloat16 on GPUs that support it, float16 on older GPUs, off on CPU")
    hardware.add_argument("--xla", choices=("auto", "on", "off"), default="auto",
                          help="XLA-compile the training step; auto (default): on with one GPU, off otherwise")
    hardware.add_argument("--multi-worker", action="store_true",
                          help="train on several machines (workers), the same command on each: the cluster from "
                               "TF_CONFIG or Slurm (TensorFlow), or KERAS_DISTRIBUTION_* or Slurm (KERAS_BACKEND=jax); "
                               "worker 0 writes the run folder, which every worker must see (a shared filesystem)")
    run_state.add_config_arguments(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Hardware: devices, precision, XLA
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Hardware:
    """Where and how the models train, set once per command from --devices, --mixed-precision and --xla."""

    strategy: object  # a tf.distribute strategy: the default one, MirroredStrategy over several devices, or
    dtype: str  # MultiWorkerMirroredStrategy; the models' dtype policy: "float32", "mixed_bfloat16", "mixed_float16"
    jit_compile: bool
    devices: list[str]
    cluster: Cluster = dataclasses.field(default_factory=Cluster)  # the workers, with --multi-worker

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def describe(self) -> str:
        where = (f"{self.cluster.describe()}, {self.cluster.local_replicas} replica(s) each" if self.cluster.multi
                 else f"{self.replicas} replica(s) on {', '.join(self.devices)}")
        return f"{where}; {self.dtype}; XLA {'on' if self.jit_compile else 'off'}"

    def distribute(self, dataset):
        """A worker's own batches as fit must get them: under MultiWorkerMirroredStrategy, as the input of its
        replicas (each batch already this worker's share, cluster.local_batch); otherwise unchanged (one process's
        strategy splits its global batches itself, and JAX's DataParallel takes each process's batch as it is)."""
        if self.cluster.multi and self.cluster.backend == "tensorflow":
            return self.strategy.distribute_datasets_from_function(lambda context: dataset)
        return dataset

    def check_batches(self, config: Config) -> None:
        """Each global batch must split evenly over the replicas."""
        if self.cluster.multi:
            return  # checked by cluster.check_batch where the splits are read
        for field in ("batch_size", "prior_batch_size"):
            if getattr(config, field) % self.replicas:
                raise UserError(f"{run_state.flag(field)} {getattr(config, field)} does not split evenly over "
                                f"{self.replicas} replicas; pass a multiple of {self.replicas} (it is the global "
                                "batch, shared by the replicas)")


def setup_hardware(args: argparse.Namespace) -> Hardware:
    """Picks the devices, the precision and XLA, and joins the cluster with --multi-worker. Must run before
    TensorFlow touches a device (logical CPU split)."""
    import tensorflow as tf

    if args.multi_worker:
        if args.devices is not None:
            raise UserError("--multi-worker uses every GPU of each worker; drop --devices")
        if not args.resume and not args.name:
            raise UserError("--multi-worker needs the run's --name (the same on every worker), or --resume RUN")

    with utils.native_stderr_captured() as probing:  # "failed call to cuInit" on every machine without a GPU
        gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        print("no GPU found: training runs on the CPU")
        if Path("/proc/driver/nvidia/version").exists():  # a driver, yet TensorFlow found no GPU: show its reasons
            print("an NVIDIA driver is installed, but TensorFlow cannot use the GPU; its start-up messages:\n"
                  + "".join(TENSORFLOW_STARTUP + probing), file=sys.stderr)
    precision = args.mixed_precision
    if precision == "auto":
        precision = gpu_precision(gpus[0]) if gpus else "off"
    dtype = "float32" if precision == "off" else f"mixed_{precision}"
    if args.multi_worker:  # every GPU of every worker; XLA only when asked for
        cluster = cluster_lib.join(keras.backend.backend())
        print(f"cluster: {cluster.describe()}, {keras.backend.backend()} backend")
        strategy = cluster.strategy or tf.distribute.get_strategy()  # JAX: keras.distribution's, set by join
        names = [f"/gpu:{i}" if gpus else "/cpu:0" for i in range(max(len(gpus), 1))]
        return Hardware(strategy, dtype, args.xla == "on", names, cluster)

    devices = args.devices if args.devices is not None else max(len(gpus), 1)
    if devices < 1:
        raise UserError(f"--devices must be 1 or more, got {devices}")
    if gpus and devices > len(gpus):
        raise UserError(f"--devices {devices} asks for more GPUs than the {len(gpus)} visible; pass --devices "
                        f"{len(gpus)} or fewer")
    names = [f"/gpu:{i}" if gpus else f"/cpu:{i}" for i in range(devices)]
    if devices == 1:
        strategy = tf.distribute.get_strategy()  # the default: no replication
    elif gpus:
        strategy = tf.distribute.MirroredStrategy(names)
    else:  # no GPU: N logical CPUs share the same cores, which tests replication but does not speed anything up
        try:
            tf.config.set_logical_device_configuration(
                tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * devices)
        except RuntimeError:
            raise UserError("--devices > 1 without a GPU splits the CPU, which must happen before TensorFlow "
                            "starts; run train.py as its own process") from None
        strategy = tf.distribute.MirroredStrategy(names)
    jit_compile = args.xla == "on" or (args.xla == "auto" and bool(gpus) and devices == 1)
    return Hardware(strategy, dtype, jit_compile, names)


def gpu_precision(gpu) -> str:
    """bfloat16 where the GPU computes it natively (compute capability 8.0+: A100, H100, RTX 30xx on), else
    float16 (with loss scaling, which Keras adds for mixed_float16)."""
    import tensorflow as tf

    capability = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
    return "bfloat16" if tuple(capability) >= (8, 0) else "float16"


# ---------------------------------------------------------------------------------------------------------------
# The run folder: a new one from the flags, or --resume RUN with the run's own settings
# ---------------------------------------------------------------------------------------------------------------


def open_run(args: argparse.Namespace, cluster: Cluster = Cluster()) -> tuple[Run, Config, tuple[str, ...]]:
    """The run folder, its config and the stages this command trains; creates nothing (the stages do, once the
    data has been read without error). Workers other than the chief get a read-only view of it."""
    if args.run:
        raise UserError(f"train.py has no --run; to train the prior of a run, type `python train.py --resume "
                        f"{args.run} --stage prior`")
    if not args.resume:
        return new_run(args, cluster)
    run = Run.open(args.resume, read_only=not cluster.is_chief)
    config = run.read_config()
    stages = STAGES[args.stage] if args.stage else run.stages
    prior = run.stage("prior")
    if args.retrain and not args.stage:
        raise UserError("--retrain trains a stage again from scratch: add --stage prior (or --stage vqvae, which "
                        "discards the prior too)")
    fresh = {"prior": PRIOR_SETTINGS, "segmenter": SEGMENTER_SETTINGS}  # settings of a stage trained from scratch
    may_change = {"data_dir"} | (fresh[stages[0]] if stages in (("prior",), ("segmenter",)) and
                                 (args.retrain or not run.stage(stages[0]).epochs_done) else set())
    overrides = run_state.config_overrides(args)
    fixed = [name for name in overrides if name not in may_change]
    if fixed:
        reason = ("a stage's settings may change only before it starts or with --retrain"
                  if fixed[0] in PRIOR_SETTINGS | SEGMENTER_SETTINGS else "only --data-dir may change, and the --prior-* settings "
                                                     "of a prior that has not started or is retrained")
        raise UserError(f"--resume continues {run.path} with the settings in its config.json; drop "
                        f"{run_state.flag(fixed[0])} ({reason})")
    if stages == ("prior",) and not run.stage("vqvae").finished:  # (a damaged VQ-VAE is named when it loads)
        raise UserError(f"{run.path} has no trained VQ-VAE yet; finish it first with "
                        f"`python train.py --resume {run.path} --stage vqvae`")
    config = dataclasses.replace(config, **overrides)
    config.validate()
    if cluster.is_chief:
        check_writable(run.path)
    return run, config, stages


def new_run(args: argparse.Namespace, cluster: Cluster = Cluster()) -> tuple[Run, Config, tuple[str, ...]]:
    """A run folder to be made from the flags (on the OASIS preset, or the demo's with --demo)."""
    if args.stage in ("prior", "segmenter"):
        raise UserError(f"--stage {args.stage} trains the {args.stage} of an existing run: add --resume runs/NAME")
    if args.retrain:
        raise UserError("--retrain trains the prior of an existing run again: add --resume runs/NAME --stage prior")
    config = run_state.config_from_args(args)
    config.validate()
    run = Run(Path(config.runs_dir) / (config.name or run_state.new_run_name()), read_only=not cluster.is_chief)
    if run.read_only:  # the chief makes the folder, and checks what it must
        return run, config, STAGES[args.stage or "all"]
    if run.exists():
        raise UserError(f"run folder {run.path} already exists; continue it with `python train.py --resume "
                        f"{run.path}`, or pick another --name")
    check_writable(run.path.parent)
    return run, config, STAGES[args.stage or "all"]


def check_writable(folder: Path) -> None:
    """A UserError unless `folder` exists as a writable folder or can be created, checked before any work."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write run folders under {folder} ({existing} is not a writable folder); "
                        "pass --runs-dir PATH to a folder you can write to")


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: the VQ-VAE
# ---------------------------------------------------------------------------------------------------------------


def train_vqvae(run: Run, config: Config, hardware: Hardware, data: dict | None, retrain: bool = False) -> None:
    """Trains (or, after a crash, continues) the VQ-VAE of a run on the images of load_training_images,
    checkpointing every epoch."""
    hardware.cluster.barrier()  # what the chief wrote before, every worker reads now
    stage = run.stage("vqvae")
    if retrain and (stage.epochs_done or run.stage("prior").epochs_done):
        print(f"retraining the VQ-VAE of {run.path} from scratch; its prior, which learned the old codes, is "
              "discarded with it")
        run.discard_stages_from("vqvae")
    if stage.finished and not retrain:
        print(f"the VQ-VAE of {run.path} is trained already")
        return
    steps_per_epoch = hardware.cluster.steps(data["num_train"], config.batch_size)
    model = stage_model(stage, config.epochs, hardware, config.seed,
                        lambda dtype, jit: modules.new_vqvae(config, steps_per_epoch, dtype, jit))
    sharpening = bool(config.sharpen_epochs)
    floors = {name: float(np.mean(utils.ssim(data["val_images"], images)))
              for name, images in utils.floor_images(data["val_images"], config.downsample).items()}
    curves = CurveWriter(stage, [
        (run.figure("ssim"), {"train_ssim": "train (sample)", "val_ssim": "validation"}, "mean SSIM",
         "VQ-VAE reconstruction SSIM", floors),
        (run.figure("losses"), {"loss": "train total (MSE + VQ" + " + spectral, last epochs" * sharpening + ")",
                                "mse": "train MSE", "val_mse": "validation MSE"},
         "loss", "VQ-VAE losses", None)])
    callbacks = [StopOnDivergence(stage, "--learning-rate", config.learning_rate),
                 RestartUnusedCodes(data["train_sample"], config.seed),
                 EpochReport(data["val_images"], data["train_sample"], config.num_embeddings), curves,
                 Checkpoint(stage)]
    print(f"VQ-VAE: {model.count_params():,} parameters, code grid {config.grid_size}x{config.grid_size}, "
          f"K={config.num_embeddings}, D={config.embedding_dim}")
    whole = config.whole_epochs
    model.fit(hardware.distribute(data["train"]), initial_epoch=stage.epochs_done, epochs=whole,
              callbacks=callbacks, verbose=fit_verbosity(), shuffle=False)  # the dataset shuffles itself
    if sharpening:
        print(f"sharpening the decoder: epochs {whole + 1}-{config.epochs} train it alone (codes frozen) with MSE + "
              f"{config.spectral_loss:g} x the log-FFT-amplitude loss")
        with hardware.strategy.scope():
            modules.compile_for_sharpening(model, config, hardware.jit_compile)
        model.fit(hardware.distribute(data["train"]), initial_epoch=max(stage.epochs_done, whole),
                  epochs=config.epochs, callbacks=[c for c in callbacks if not isinstance(c, RestartUnusedCodes)],
                  verbose=fit_verbosity(), shuffle=False)

    history = curves.history
    val_recon, val_codes = utils.reconstruct(model, data["val_images"])
    show = np.linspace(0, len(val_recon) - 1, 8).astype(int)
    if not run.read_only:
        utils.plot_image_rows(run.figure("recon"), {"validation originals": data["val_images"][show],
                                                    "reconstructions": val_recon[show]},
                              title=f"VQ-VAE reconstructions, mean validation SSIM {history['val_ssim'][-1]:.3f}")
    usage = utils.codebook_usage(val_codes, config.num_embeddings)
    metrics = {"epochs": config.epochs, "train_seconds": round(history["seconds"][-1], 1),
               "hardware": hardware.describe(), "val_ssim": history["val_ssim"][-1], "val_ssim_floors": floors,
               "num_embeddings": config.num_embeddings, "val_perplexity": usage["perplexity"],
               "val_codes_used": usage["codes_used"]}
    run.update_metrics("vqvae", metrics)
    stage.mark_finished()
    floors_text = ", ".join(f"{name} {value:.3f}" for name, value in floors.items())
    print(f"VQ-VAE done in {metrics['train_seconds']:.0f} s: validation SSIM {metrics['val_ssim']:.4f} "
          f"(floors: {floors_text}); codes used {usage['codes_used']}/{config.num_embeddings}")


def load_training_images(config: Config, demo: bool, hardware: Hardware) -> dict:
    """Finds, checks and decodes the train and validation splits (before any run folder is created); of the train
    split, this worker's shard."""
    cluster = hardware.cluster
    if demo and not Path(config.data_dir).exists() and cluster.is_chief:
        dataset.make_demo(config.data_dir)
    cluster.barrier()  # the chief's demo set is written
    train_files = dataset.split_files(config.data_dir, "train")
    val_files = dataset.split_files(config.data_dir, "validate")
    print(f"data: {len(train_files)} train / {len(val_files)} validation slices from {config.data_dir}, "
          f"at {config.image_size}x{config.image_size}")
    cluster.check_batch("--batch-size", config.batch_size, len(train_files), "train")
    train = dataset.make_dataset(cluster.shard(train_files), config.image_size, cluster.local_batch(config.batch_size),
                                 shuffle=True, seed=config.seed,
                                 epoch_size=cluster.epoch_size(len(train_files), config.batch_size))
    val_images = dataset.load_images(val_files, config.image_size)
    # Train SSIM is measured on a fixed sample of training slices as large as the validation split.
    pick = np.random.default_rng(config.seed).choice(len(train_files), min(len(val_files), len(train_files)),
                                                     replace=False)
    train_sample = dataset.load_images([train_files[i] for i in sorted(pick)], config.image_size)
    return dict(train=train, num_train=len(train_files), val_images=val_images, train_sample=train_sample)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: the prior, on the code grids of the trained VQ-VAE
# ---------------------------------------------------------------------------------------------------------------


def train_prior(run: Run, config: Config, hardware: Hardware, retrain: bool = False) -> None:
    """Trains (or, after a crash, continues) the prior of a run on its cached codes, checkpointing every epoch."""
    hardware.cluster.barrier()  # the chief has written the trained VQ-VAE
    stage = run.stage("prior")
    if stage.finished and not retrain:
        print(f"the prior of {run.path} is trained already; to train it again: `python train.py --resume "
              f"{run.path} --stage prior --retrain`")
        return
    with cluster_lib.alone():  # each worker encodes its own shard with its own copy
        vqvae = run.stage("vqvae").load_model()
    cached = {split: encoded_split(run, vqvae, config, split, cluster=hardware.cluster)
              for split in ("train", "validate")}
    if config.prior_position_frequencies and any(positions is None for _, positions in cached.values()):
        print("note: the file names carry no slice numbers (like case_001_slice_12.nii.png), so the prior is "
              "unconditional")
        config = dataclasses.replace(config, prior_position_frequencies=0)
    run.write_config(config)  # only now: a data error above must leave the run as it was
    if retrain:
        print(f"retraining the prior of {run.path} from scratch")
        run.discard_stages_from("prior")
    cluster = hardware.cluster
    for split, (codes, _) in cached.items():
        cluster.check_batch("--prior-batch-size", config.prior_batch_size, len(codes), split)
    steps_per_epoch = cluster.steps(len(cached["train"][0]), config.prior_batch_size)
    prior = stage_model(stage, config.prior_epochs, hardware, config.seed,
                        lambda dtype, jit: modules.new_prior(config, steps_per_epoch, dtype, jit))
    curves = CurveWriter(stage, [(run.figure("prior_loss"), {"bits_per_code": "train",
                                                             "val_bits_per_code": "validation"},
                                  "NLL (bits per code)", "PixelCNN prior", None)])
    # a uniform prior's loss is ln K nats per code; ten times that is no prior's, trained or not
    diverged = StopOnDivergence(stage, "--prior-learning-rate", config.prior_learning_rate,
                                ceiling=10 * np.log(config.num_embeddings))
    callbacks = [diverged, BitsPerCode(), curves, Checkpoint(stage)]
    conditioned = ", conditioned on the slice position" if prior.num_conditions else ""
    grid = f"{config.grid_size}x{config.grid_size} grid"
    reach = (f"{prior.attention_layers} attention layer(s): each code sees every code before it in the {grid}"
             if prior.attention_layers else f"receptive field {prior.receptive_rows()} rows of the {grid}")
    print(f"PixelCNN prior: {prior.count_params():,} parameters, {config.prior_layers} gated layers, "
          f"{reach}{conditioned}")
    if prior.layout_levels:
        print(f"two-level prior: a {prior.layout_shape[0]}x{prior.layout_shape[1]} layout of "
              f"{prior.layout_levels} intensity levels first, then the codes given it")
    if config.prior_augment:
        flipped = encoded_split(run, vqvae, config, "train", flipped=True, cluster=cluster)
        print(f"augmentation: the training slices and their mirror images, each grid shifted by -{config.prior_augment}"
              f", 0 or +{config.prior_augment} codes at random")
        batches = augmented_batches(prior, cached["train"], flipped, config, vqvae, cluster)
    else:
        batches = local_batches(cluster, prior_inputs(prior, *cached["train"], vqvae), config.prior_batch_size,
                                shuffle=True, seed=config.seed)
    validation = local_batches(cluster, prior_inputs(prior, *cached["validate"], vqvae), config.prior_batch_size)
    best = BestWeights()
    prior.fit(hardware.distribute(batches), validation_data=hardware.distribute(validation),
              initial_epoch=stage.epochs_done, epochs=config.prior_epochs, callbacks=[*callbacks, best],
              verbose=fit_verbosity(), shuffle=False)  # the dataset shuffles itself
    history = curves.history
    kept = best.restore(prior, stage, config.prior_epochs)

    metrics = {"epochs": config.prior_epochs, "train_seconds": round(history["seconds"][-1], 1),
               "hardware": hardware.describe(), "val_bits_per_code": history["val_bits_per_code"][kept - 1],
               "train_bits_per_code": history["bits_per_code"][kept - 1], "kept_epoch": kept,
               "uniform_bits_per_code": float(np.log2(config.num_embeddings))}
    run.update_metrics("prior", metrics)
    stage.mark_finished()
    print(f"prior done in {metrics['train_seconds']:.0f} s: validation NLL {metrics['val_bits_per_code']:.3f} "
          "bits/code")


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: the tissue segmenter, which predict.py's tissue report reads samples with
# ---------------------------------------------------------------------------------------------------------------


def train_segmenter(run: Run, config: Config, hardware: Hardware, retrain: bool = False) -> None:
    """Trains (or continues) the run's tissue segmenter on the training slices and their segmentations; skipped,
    with a line, when the data has none."""
    hardware.cluster.barrier()
    stage = run.stage("segmenter")
    if stage.finished and not retrain:
        print(f"the tissue segmenter of {run.path} is trained already")
        return
    train_split = dataset.Split.load(config.data_dir, "train", config.image_size)
    labels = train_split.tissue()
    if labels is None:
        print(f"note: {config.data_dir} has no segmentations (keras_png_slices_seg_* beside the slices), so no tissue "
              "segmenter and no tissue report")
        return
    val = dataset.Split.load(config.data_dir, "validate", config.image_size)
    val_labels = val.tissue()
    if retrain:
        print(f"retraining the tissue segmenter of {run.path} from scratch")
        run.discard_stages_from("segmenter")
    cluster = hardware.cluster
    cluster.check_batch("--batch-size", config.batch_size, len(labels), "train")
    steps_per_epoch = cluster.steps(len(labels), config.batch_size)
    model = stage_model(stage, config.segmenter_epochs, hardware, config.seed,
                        lambda dtype, jit: modules.new_segmenter(config, steps_per_epoch, class_weights(labels),
                                                                 dtype, jit))
    curves = CurveWriter(stage, [])
    batches = local_batches(cluster, (train_split.images, labels.astype("int32")), config.batch_size, shuffle=True,
                            seed=config.seed)
    print(f"tissue segmenter: {model.count_params():,} parameters, a U-Net of {len(model.channels)} levels")
    model.fit(hardware.distribute(batches), initial_epoch=stage.epochs_done, epochs=config.segmenter_epochs,
              callbacks=[StopOnDivergence(stage, "--segmenter-learning-rate", config.segmenter_learning_rate),
                         curves, Checkpoint(stage)], verbose=fit_verbosity(), shuffle=False)
    dice = realism.dice(realism.segment(model, val.images), val_labels)
    run.update_metrics("segmenter", {"epochs": config.segmenter_epochs,
                                     "train_seconds": round(curves.history["seconds"][-1], 1), "val_dice": dice})
    stage.mark_finished()
    print(f"tissue segmenter done in {curves.history['seconds'][-1]:.0f} s: validation Dice "
          + ", ".join(f"{tissue} {value:.3f}" for tissue, value in dice.items()))


def class_weights(labels: np.ndarray) -> list[float]:
    """Weights of the tissue classes, 1 / sqrt(share of the pixels), scaled to a pixel-weighted mean of 1: the rare
    class (CSF) counts more, without drowning the others."""
    share = np.bincount(labels.ravel(), minlength=len(modules.TISSUES)) / labels.size
    weights = 1 / np.sqrt(np.maximum(share, 1e-4))
    return [float(w) for w in weights / np.sum(share * weights)]


def encoded_split(run: Run, vqvae, config: Config, split: str, flipped: bool = False, chunk: int = 1024,
                  cluster: Cluster = Cluster()) -> tuple[np.ndarray, np.ndarray | None]:
    """The (N, h, w) int16 code grids of a split and the (N,) slice positions of its files (None when the names carry
    no slice numbers): encoded once, `chunk` files at a time, then read from the run folder. flipped: of the slices
    mirrored left-right (the encoder is not mirror-symmetric, so these are other grids, not mirrored ones). Several
    workers encode a shard each, gathered into the whole split on every worker; the chief caches it."""
    files = dataset.split_files(config.data_dir, split)
    name = split + "_flipped" * flipped
    cached = run.read_codes(name)
    if cached is not None and len(cached[0]) == len(files):
        return cached
    if cached is not None:
        print(f"note: the cached {split} codes are of {len(cached[0])} slices, {config.data_dir} has {len(files)}; "
              "encoding them again")
    start = time.time()
    order = slice(None, None, -1 if flipped else 1)
    mine = cluster.shard(files)
    padded = list(cluster.pad_shard(np.asarray(mine), len(files)))  # every worker encodes as many, in the same calls
    codes = np.concatenate([utils.batched(vqvae.encode, dataset.load_images(padded[i:i + chunk], config.image_size)[
        :, :, order]) for i in range(0, len(padded), chunk)]).astype(np.int16)
    codes = cluster.gather(codes[:len(mine)], len(files))
    positions = dataset.slice_positions(files)
    run.write_codes(name, codes, positions)
    workers = f" by {cluster.workers} workers" if cluster.multi else ""
    print(f"encoded the {split} split{' (mirrored)' * flipped}{workers}: {codes.shape[0]} code grids of "
          f"{codes.shape[1]}x{codes.shape[2]} in {time.time() - start:.0f} s")
    return codes, positions


def augmented_batches(prior, train: tuple, flipped: tuple, config: Config, vqvae, cluster: Cluster = Cluster()):
    """The prior's training batches with --prior-augment: the training grids and their mirror images' grids, an
    epoch of as many grids as the training split has, each shifted at random (dataset.shifted_code_batches); of
    this worker's shard of both."""
    codes = np.concatenate([train[0], flipped[0]]).astype("int32")
    arrays = {"codes": codes}
    if prior.num_conditions:
        arrays["condition"] = np.asarray(modules.slice_position_features(np.concatenate([train[1], flipped[1]]),
                                                                         prior.num_conditions // 2))
    fills = {"codes": int(np.bincount(codes[:, 0, 0]).argmax())}  # the corner's code: the empty frame's
    if prior.layout_levels:
        arrays["layout"] = utils.code_layouts(vqvae, codes, prior.layout_levels).astype("int32")
        fills["layout"] = int(np.bincount(arrays["layout"][:, 0, 0]).argmax())
    arrays = {key: np.concatenate([cluster.shard(half) for half in np.split(array, 2)])
              for key, array in arrays.items()}  # this worker's slices, and their mirror images
    examples = dataset.shifted_code_batches(arrays, config.prior_augment, fills,
                                            cluster.local_batch(config.prior_batch_size),
                                            epoch_size=cluster.epoch_size(len(train[0]), config.prior_batch_size)
                                            or len(train[0]), seed=config.seed)
    def packed(example):  # a tuple where the prior takes a list: tf.data cannot return lists
        inputs = prior.pack_inputs(example["codes"], example.get("condition"), example.get("layout"))
        return tuple(inputs) if isinstance(inputs, list) else inputs, prior.pack_targets(example["codes"],
                                                                                        example.get("layout"))

    return examples.map(packed)


def local_batches(cluster: Cluster, arrays: tuple, global_batch: int, shuffle: bool = False, seed: int = 0):
    """(inputs, targets) arrays of a whole split -> this worker's batches of its shard (dataset.array_dataset)."""
    total = len(keras.tree.flatten(arrays)[0])
    inputs, targets = keras.tree.map_structure(cluster.shard, arrays)
    return dataset.array_dataset(inputs, targets, cluster.local_batch(global_batch), shuffle=shuffle, seed=seed,
                                 epoch_size=cluster.epoch_size(total, global_batch))


def prior_inputs(prior, codes: np.ndarray, positions: np.ndarray | None, vqvae) -> tuple:
    """(inputs, targets) of the prior for code grids: the grids, with their slice-position features if the prior
    is conditioned on them and their layouts (decoded by `vqvae`) if it has two levels."""
    codes = codes.astype("int32")
    condition = (np.asarray(modules.slice_position_features(positions, prior.num_conditions // 2))
                 if prior.num_conditions else None)
    layouts = utils.code_layouts(vqvae, codes, prior.layout_levels) if prior.layout_levels else None
    return prior.pack_inputs(codes, condition, layouts), prior.pack_targets(codes, layouts)


# ---------------------------------------------------------------------------------------------------------------
# What both stages share: the model to train (new or resumed), and the callbacks around model.fit
# ---------------------------------------------------------------------------------------------------------------

STAGE_LABELS = {"vqvae": "VQ-VAE", "prior": "prior", "segmenter": "tissue segmenter"}


def seed_everything(seed: int) -> None:
    """The one place the run's seed (--seed) is set, for Python, NumPy and the backend: before the data pipeline is
    made (tf.data's shuffle takes TensorFlow's global seed; a pipeline made before would shuffle by whatever seed
    the process had, a notebook's previous run's say), and again before a stage's new model is built, so that a
    stage draws the same initial weights whether it runs after the other stage in one process or on its own."""
    keras.utils.set_random_seed(seed)


def stage_model(stage: run_state.Stage, epochs: int, hardware: Hardware, seed: int, build):
    """The model of a stage on the hardware: its checkpoint when resuming (with the weights, the optimizer state
    and the precision it started with), else build(dtype, jit_compile) from the run's seed."""
    hardware.cluster.barrier()  # the chief has discarded what a --retrain discards
    with hardware.strategy.scope():  # variables created here are mirrored on every replica
        if not stage.epochs_done:
            seed_everything(seed)
            return build(hardware.dtype, hardware.jit_compile)
        model = stage.load_model()
        model.jit_compile = hardware.jit_compile
    print(f"resuming the {STAGE_LABELS[stage.name]} after epoch {stage.epochs_done} of {epochs}")
    if model.dtype_policy.name != hardware.dtype:
        print(f"note: the {stage.name} checkpoint trains on in {model.dtype_policy.name}, the precision it started "
              "with")
    return model


def fit_verbosity() -> int:
    return 1 if sys.stdout.isatty() else 2  # progress bars in a terminal, one line per epoch in a log file


class EpochReport(keras.callbacks.Callback):
    """After each VQ-VAE epoch: SSIM on the validation split and on the train sample, validation MSE and codebook
    usage go into the logs (and from there into history.csv)."""

    def __init__(self, val_images, train_sample, num_embeddings: int):
        super().__init__()
        self.val_images, self.train_sample, self.num_embeddings = val_images, train_sample, num_embeddings

    def on_epoch_end(self, epoch, logs=None):
        val_recon, val_codes = utils.reconstruct(self.model, self.val_images)
        train_recon, _ = utils.reconstruct(self.model, self.train_sample)
        logs["val_ssim"] = float(np.mean(utils.ssim(self.val_images, val_recon)))
        logs["train_ssim"] = float(np.mean(utils.ssim(self.train_sample, train_recon)))
        logs["val_mse"] = float(np.mean((self.val_images - val_recon) ** 2))
        usage = utils.codebook_usage(val_codes, self.num_embeddings)
        logs["val_perplexity"], logs["val_codes_used"] = usage["perplexity"], usage["codes_used"]
        print(f"epoch {epoch + 1}: val SSIM {logs['val_ssim']:.4f} (train {logs['train_ssim']:.4f}), "
              f"codes used {usage['codes_used']}/{self.num_embeddings}, perplexity {usage['perplexity']:.1f}")


class BitsPerCode(keras.callbacks.Callback):
    """Adds the prior's cross-entropy in bits per code (nats / ln 2) to the logs."""

    def on_epoch_end(self, epoch, logs=None):
        logs["bits_per_code"] = logs["loss"] / np.log(2)
        logs["val_bits_per_code"] = logs["val_loss"] / np.log(2)
        print(f"epoch {epoch + 1}: validation NLL {logs['val_bits_per_code']:.3f} bits/code "
              f"(train {logs['bits_per_code']:.3f}; uniform would be {np.log2(self.model.num_embeddings):.1f})")


class BestWeights(keras.callbacks.Callback):
    """Keeps (in memory) the weights of the epoch with the lowest validation loss; restore() puts them back into the
    stage's checkpoint at the end. A prior past its best validation NLL memorises: on a GPU its samples grew less
    real with every epoch after it (docs/experiments.md). Epochs before a resume are not compared."""

    def __init__(self):
        super().__init__()
        self.best, self.epoch, self.weights = np.inf, 0, None

    def on_epoch_end(self, epoch, logs=None):
        if logs["val_loss"] < self.best:
            self.best, self.epoch, self.weights = logs["val_loss"], epoch + 1, self.model.get_weights()

    def restore(self, model, stage: run_state.Stage, epochs: int) -> int:
        """The epoch whose weights the checkpoint holds: the best one, rewritten there if it was not the last."""
        if self.weights is None or self.epoch == epochs:
            return epochs
        model.set_weights(self.weights)
        with cluster_lib.alone():
            stage.save_checkpoint(model, epochs_done=epochs)
        print(f"kept the weights of epoch {self.epoch}, whose validation NLL ({self.best / np.log(2):.3f} bits/code) "
              f"was the lowest")
        return self.epoch


class RestartUnusedCodes(keras.callbacks.Callback):
    """Before each epoch after the first, codes that no vector of the training sample picks are moved onto
    encoder outputs of that sample (codebook collapse otherwise leaves most of the codebook unused)."""

    def __init__(self, train_sample: np.ndarray, seed: int):
        super().__init__()
        self.train_sample, self.seed = train_sample, seed

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 0:
            return
        z_e = utils.batched(self.model.encoder, self.train_sample)
        moved = self.model.quantizer.restart_unused_codes(z_e, seed=self.seed + epoch)
        if moved:
            print(f"restarted {moved} unused codes from encoder outputs")


class StopOnDivergence(keras.callbacks.Callback):
    """Stops training at the first batch whose loss (the epoch's running mean) is NaN, infinite or above
    `ceiling`, a loss that no model of the stage reaches, trained or not, before anything of that epoch is saved.
    (A learning rate of 1e30 made the prior's loss NaN with one order of batches and 4e29, finite, with another.)
    Its batch ends and epoch starts are also where a Ctrl-C or SIGTERM stops training (utils.stops_at_safe_points)."""

    def __init__(self, stage: run_state.Stage, flag: str, learning_rate: float, ceiling: float = np.inf):
        super().__init__()
        self.stage, self.flag, self.learning_rate, self.ceiling = stage, flag, learning_rate, ceiling
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        utils.raise_if_stopped()
        self.epoch = epoch

    def on_test_batch_end(self, batch, logs=None):  # the validation passes inside fit
        utils.raise_if_stopped()

    def on_train_batch_end(self, batch, logs=None):
        utils.raise_if_stopped()
        loss = float(logs["loss"])
        if not loss <= self.ceiling:  # NaN fails every comparison
            label = STAGE_LABELS[self.stage.name]
            if self.epoch:
                kept = f"its checkpoint of epoch {self.epoch} in {self.stage.run.path} is kept"
            else:
                kept = f"before any {label} epoch finished"
            if self.stage.name == "prior":
                kept += "; the trained VQ-VAE is kept"
            raise Diverged(f"the {label} loss became {loss:.3g} in epoch {self.epoch + 1}, {kept}. "
                           f"Lower {self.flag} (it was {self.learning_rate:g}) and train again")


class Diverged(UserError):
    """Training produced a NaN, infinite or impossibly large loss."""


class CurveWriter(keras.callbacks.Callback):
    """Keeps every epoch's logs; after each epoch rewrites the stage's history CSV and its plots, so a run can be
    watched while it trains. plots: list of (path, {column: label}, y label, title, floors). A resumed stage
    continues the history of its completed epochs, and its curves continue from there."""

    def __init__(self, stage: run_state.Stage, plots: list):
        super().__init__()
        self.stage, self.plots = stage, plots
        self.history: dict[str, list] = stage.read_history()
        self.start = time.time() - (self.history["seconds"][-1] if self.history.get("seconds") else 0.0)

    def on_epoch_end(self, epoch, logs=None):
        logs["seconds"] = time.time() - self.start
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        self.stage.write_history(self.history)
        if self.stage.run.read_only:
            return  # another worker's view: the chief draws the plots
        for path, series, ylabel, title, floors in self.plots:
            utils.plot_curves(path, self.history, series, ylabel, title, floors=floors)


class Checkpoint(keras.callbacks.Callback):
    """At each epoch end: the model with its optimizer state, then the epoch count (Stage.save_checkpoint)."""

    def __init__(self, stage: run_state.Stage):
        super().__init__()
        self.stage = stage

    def on_epoch_end(self, epoch, logs=None):
        with cluster_lib.alone():  # only the chief writes (a read-only Run skips it)
            self.stage.save_checkpoint(self.model, epochs_done=epoch + 1)


if __name__ == "__main__":
    sys.exit(main())
