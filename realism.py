"""The realism test: a classifier two-sample test (C2ST, Lopez-Paz & Oquab 2017) that asks whether a small CNN can
tell generated slices from real ones, with intervals over subjects; and how predict.py runs it on a run's samples.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np
from keras import layers
from scipy import ndimage, stats

import dataset
import modules
from utils import BRAIN_THRESHOLD, batched, code_layouts, depth_bands, downsized, nearest_ssim, reconstruct, summarize

# The judge and how it is trained: docs/experiments.md ("The realism judge") measured these against the alternatives.
JUDGE_CHANNELS = (8, 16, 32, 64)  # the judge's four strided convolutions
C2ST_SIZE = 128  # the judge sees images at this size at most: at 64 px the samples' blotchy texture averages away
C2ST_FOLDS = 3  # each image judged by a judge trained on the other two thirds: half the training of 5 folds
C2ST_EPOCHS = 40  # at 20 the judge had not learned to look yet
C2ST_JUDGES = 3  # each fold's verdict is the mean evidence of 3 judges drawn with other seeds: one judge's accuracy
# on the same images moved by up to 0.2 with its seed, three judges' by about half that (docs/experiments.md)
COPY_SHORTLIST = 16  # training slices nearest on thumbnails scored by SSIM per image: with 32, the mean moved by 0.002
JUDGE_SEED_STRIDE = 1000  # a fold's judges are seeded seed + fold + 1000 j: apart from other folds' and draws'


class PatchConv(layers.Layer):
    """The judge's first layer: a 3x3 stride-2 'same' convolution of one channel, applied to the image's 3x3
    neighbourhoods (first_layer_patches) as one matrix product. The same function, weights (3, 3, 1, filters) and
    initialisation as layers.Conv2D; a convolution of one input channel ran at a ninth of the speed of the layers
    after it (half the judge's training time for 8% of its multiplications), and the neighbourhoods of a C2ST's images
    are cut once, not every pass. The judge is never saved, so the layer is not registered."""

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.initializer = keras.initializers.get("glorot_uniform")  # made here, as Conv2D does: the same draws

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(3, 3, 1, self.filters), initializer=self.initializer)
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, patches):  # (N, S/2, S/2, 9) -> (N, S/2, S/2, filters)
        n, height, width, _ = keras.ops.shape(patches)
        # one 2-D product over every position: faster than the same as a batched 4-D one
        flat = keras.ops.matmul(keras.ops.reshape(patches, (-1, 9)), keras.ops.reshape(self.kernel, (9, self.filters)))
        return keras.ops.relu(keras.ops.reshape(flat, (n, height, width, self.filters)) + self.bias)


def first_layer_patches(images: np.ndarray) -> np.ndarray:
    """(N, S, S, 1) -> (N, ceil(S/2), ceil(S/2), 9): the 3x3 neighbourhood each output of a stride-2 'same'
    convolution reads (zero-padded as Keras pads: the odd pixel at the bottom and right), in the kernel's row-major
    order."""
    size, out = images.shape[1], -(-images.shape[1] // 2)
    pad = max(2 * (out - 1) + 3 - size, 0)
    padded = np.pad(images[..., 0], ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    return np.stack([padded[:, a:a + 2 * out - 1:2, b:b + 2 * out - 1:2] for a in range(3) for b in range(3)], axis=-1)


def realism_classifier(size: int):
    """The C2ST's judge: four stride-2 3x3 convolutions (8, 16, 32, 64 channels), then the average over positions of
    the map's evidence, then one logit, "second set". Averaging local evidence (as a PatchGAN discriminator does)
    lets it learn from every patch, which generalises from a few hundred images: flattening the map instead, it
    memorised them and scored samples that no eye takes for real as 0.55 (docs/experiments.md). Its
    narrow first layers make it 1.7x faster than with 16, 32, 64, 64 channels and no less sharp. It reads the
    images' first_layer_patches (the first convolution as PatchConv)."""
    half = -(-size // 2)
    model = keras.Sequential([keras.Input((half, half, 9)), PatchConv(JUDGE_CHANNELS[0])]
                             + [layers.Conv2D(channels, 3, strides=2, padding="same", activation="relu")
                                for channels in JUDGE_CHANNELS[1:]]
                             + [layers.GlobalAveragePooling2D(), layers.Dropout(0.3), layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  steps_per_execution=16)  # small steps: run 16 per call, not one (the same steps, faster)
    return model


_JUDGES: dict = {}  # size -> (a compiled judge, its optimizer's initial state)


def _fresh_judge(size: int):
    """A judge with the weights realism_classifier(size) draws under the current seed and a fresh optimizer, in a
    model whose training step is already compiled: a new model per fold would trace its step anew, which takes
    longer than training it on a few hundred small images."""
    drawn = realism_classifier(size)  # fresh weights and dropout seed; compiled, never run: cheap
    if size not in _JUDGES:
        drawn.optimizer.build(drawn.trainable_variables)
        _JUDGES[size] = drawn, [np.asarray(v) for v in drawn.optimizer.variables]
        return drawn
    judge, optimizer_state = _JUDGES[size]
    for target, source in zip(judge.variables, drawn.variables):  # weights and the dropout's seed state
        target.assign(source)
    for variable, value in zip(judge.optimizer.variables, optimizer_state):  # step count and Adam's moments
        variable.assign(value)
    return judge


def c2st(first, second, groups: tuple | None = None, folds: int = C2ST_FOLDS,
         epochs: int = C2ST_EPOCHS, size: int = C2ST_SIZE, seed: int = 0, judges: int = C2ST_JUDGES) -> dict:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017): can a small CNN tell images of `second` from images of
    `first`? Both sets are cut to the same size n and downsized to at most size x size; in k-fold cross-validation
    each image is judged by a classifier trained on the other folds. The accuracy is 0.5 when the sets cannot be
    told apart and 1.0 when they always can. judges: how many classifiers, drawn with different seeds, judge each
    fold together (the mean of their logits): whether one small judge finds what tells the sets apart hangs on its
    draw, and the bootstrap interval below cannot see that; "judges_alone" is the accuracy each fold's j-th judge
    would have had alone, which shows how far one judge's verdict moves.

    first: one array, or a list of arrays, the draws (e.g. fresh samples each time). Each draw is judged against
    `second` with folds and judges of its own, and the accuracy is over every draw's judgments: one draw of 128
    samples moves by about 0.1 with the seed (docs/experiments.md); "draws" lists each draw's. second: one array,
    judged against every draw, or a list of arrays, one a draw (e.g. other deals of real subjects into two sets).

    groups: (ids of first, or a list of them per draw; ids of second), e.g. each slice's subject. A group's images
    share a fold, so no image is judged by a classifier that learned its near-duplicates (its subject's
    neighbouring slices), which would reward memorising subjects rather than telling the sets apart. Each set's
    groups are dealt out over the folds on their own, so that every fold holds both sets. With fewer than 2 groups
    in a set, its images are judged one by one ("grouped": false). Default: every image is a group of its own; the
    same id in two draws is the same group (the same subject judged again).

    The 95% interval resamples whole groups (a cluster bootstrap) over all draws: the slices of one subject are
    judged alike, so a few subjects make a wide interval however many slices or draws they have. "p_value": the
    chance of an accuracy this high or higher if the judge guessed (each of the n judgments right with probability
    0.5: binomial, one-sided); it treats judgments as independent, which slices of one subject are not, so read it
    beside the interval.

    Both sets reach the judge the same way: rounded to 8 bits, as PNG slices are (generated images are floats), then
    downsized (utils.downsized): a judge must not win on rounding or on a resize filter.
    """
    if judges < 1:
        raise ValueError(f"a C2ST needs at least one judge a fold, got judges={judges}")
    draws = first if isinstance(first, list) else [first]
    seconds = second if isinstance(second, list) else [second] * len(draws)
    if len(seconds) != len(draws):
        raise ValueError(f"a C2ST needs one second set a draw: {len(draws)} draws, {len(seconds)} second sets")
    first_ids, second_ids = [None, None] if groups is None else groups
    first_ids, second_ids = (ids if isinstance(ids, list) else [ids] * len(draws) for ids in (first_ids, second_ids))
    results = []
    for draw, (images, ids, other, other_ids) in enumerate(zip(draws, first_ids, seconds, second_ids)):
        new = [f"draw {draw} image {i}" for i in range(max(len(images), len(other)))]  # new images each draw
        ids = new[:len(images)] if ids is None else ids
        if other_ids is None:  # one fixed set: an image judged in two draws is one group
            other_ids = np.arange(len(other)) if not isinstance(second, list) else new[:len(other)]
        results.append(_judged((images, np.asarray(ids).astype(str)), (other, np.asarray(other_ids).astype(str)),
                               folds, epochs, size, seed=seed + draw * folds, judges=judges))  # no two share a seed
    outcomes = [np.concatenate([r["correct"][s] for r in results]) for s in (0, 1)]
    ids = [np.unique(np.concatenate([r["labels"][s] for r in results]), return_inverse=True)[1] for s in (0, 1)]
    interval = cluster_bootstrap_interval(outcomes, ids, np.random.default_rng(seed))
    judged = np.concatenate(outcomes)
    return {"accuracy": float(judged.mean()), "ci95": interval,
            "p_value": float(stats.binom.sf(judged.sum() - 1, judged.size, 0.5)),
            "draws": [float(np.concatenate(r["correct"]).mean()) for r in results],
            "judges_alone": [float(a) for a in np.mean([r["alone"] for r in results], axis=0)],
            "n_per_set": len(results[0]["correct"][0]), "folds": min(r["folds"] for r in results),
            "grouped": groups is not None and all(r["grouped"] for r in results),
            "groups_per_set": [int(i.max() + 1) for i in ids]}


def _judged(first: tuple, second: tuple, folds: int, epochs: int, size: int, seed: int, judges: int = 1) -> dict:
    """One draw of the C2ST: (images, group labels) of each set; whether each judged image was judged right, the
    group labels of the judged images (each image's own index where a set has fewer than 2 groups), and the accuracy
    each of the `judges` judges of every fold would have had alone."""
    rng = np.random.default_rng(seed)
    n, size = min(len(first[0]), len(second[0])), min(size, first[0].shape[1])
    picks = [rng.permutation(len(images))[:n] for images, _ in (first, second)]
    images = np.concatenate([downsized(as_8_bit(s[0][p]), size) for s, p in zip((first, second), picks)])
    x = first_layer_patches(images.astype("float32"))
    y = np.repeat([0.0, 1.0], n).astype("float32")
    labels = [s[1][p] for s, p in zip((first, second), picks)]
    ids = [np.unique(label, return_inverse=True)[1] for label in labels]  # each set's groups, numbered from 0
    grouped = min(i.max() + 1 for i in ids) >= 2
    if not grouped:  # judged one by one: each image a group of its own
        labels = [np.array([f"{label} #{p}" for label, p in zip(l, pick)]) for l, pick in zip(labels, picks)]
        ids = [np.arange(n), np.arange(n)]
    folds = min(folds, *(i.max() + 1 for i in ids))
    fold = np.concatenate([(rng.permutation(i.max() + 1) % folds)[i] for i in ids])  # a group's images share one
    judged, alone = np.zeros(2 * n, bool), np.zeros((judges, 2 * n), bool)  # alone: each judge's own verdicts
    for k in range(folds):
        train, test = fold != k, fold == k
        ones = y[train].mean()  # folds of whole groups are not balanced: weigh the classes equal in training, or a
        weights = {0: 0.5 / (1 - ones), 1: 0.5 / ones}  # judge that sees no difference guesses the majority
        evidence = np.zeros(test.sum(), "float32")
        for j in range(judges):  # the first judge's seed is what one judge alone had
            judge_seed = seed + k + JUDGE_SEED_STRIDE * j
            keras.utils.set_random_seed(judge_seed)
            model = _fresh_judge(size)
            passes = dataset.array_dataset(x[train], y[train], 32, shuffle=True, seed=judge_seed, passes=epochs)
            model.fit(passes, epochs=1, verbose=0, shuffle=False, class_weight=weights)  # `epochs` passes, shuffled
            logits = batched(lambda batch: model(batch, training=False), x[test])[:, 0]  # eager: no retracing
            alone[j, test] = (logits > 0) == (y[test] == 1)
            evidence += logits
        judged[test] = (evidence > 0) == (y[test] == 1)
    return {"correct": (judged[:n], judged[n:]), "labels": labels, "grouped": bool(grouped), "folds": folds,
            "alone": alone.mean(axis=1)}


def as_8_bit(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] rounded to the 256 levels of an 8-bit PNG, as float32: generated images are floats, and so
    are real slices resized on loading (the demo's 256 px PNGs at 128 px); slices read at their stored size are
    unchanged."""
    return (np.round(np.clip(images, 0, 1) * 255) / 255).astype("float32")


def interior_shuffled(images: np.ndarray, rng, patch: int = 8) -> np.ndarray:
    """A known-answer set that mimics blotchy samples: each slice's brain interior cut into patch x patch tiles
    that lie wholly inside the brain (above utils.BRAIN_THRESHOLD), shuffled among themselves; tiles touching the
    background stay, so the outline and the intensity histogram are kept, the anatomy is not."""
    out = np.array(images, copy=True)
    n, h, w, _ = images.shape
    for image, shuffled in zip(images, out):
        tiles = [(i, j) for i in range(0, h - patch + 1, patch) for j in range(0, w - patch + 1, patch)
                 if (image[i:i + patch, j:j + patch] > BRAIN_THRESHOLD).all()]
        for (i, j), (a, b) in zip(tiles, [tiles[k] for k in rng.permutation(len(tiles))]):
            shuffled[i:i + patch, j:j + patch] = image[a:a + patch, b:b + patch]
    return out


def cluster_bootstrap_interval(outcomes: list, ids: list, rng, resamples: int = 2000) -> list[float]:
    """95% interval of the mean of boolean outcomes (one array per set) when the outcomes of a group (ids) are
    alike: each resample draws whole groups, with replacement, within each set."""
    correct, total = 0.0, 0.0
    for outcome, group in zip(outcomes, ids):
        per_group = np.bincount(group, weights=outcome), np.bincount(group)  # correct and judged per group
        draws = rng.integers(0, len(per_group[1]), (resamples, len(per_group[1])))
        correct, total = correct + per_group[0][draws].sum(1), total + per_group[1][draws].sum(1)
    return [float(v) for v in np.percentile(correct / total, [2.5, 97.5])]


# ---------------------------------------------------------------------------------------------------------------
# The realism test of a run's samples, as predict.py runs it
# ---------------------------------------------------------------------------------------------------------------

DRAWS = 1  # one draw of every real slice (384 a split on the demo set) moves by about 0.01 with the seed; three draws
# were needed when 128 slices were drawn from 6 subjects (docs/experiments.md)
LABELS = {"real_vs_real": "real validation slices (the ideal)",
          "reconstructions_vs_real": "VQ-VAE reconstructions (a perfect prior's)",
          "samples_vs_real": "samples, depths drawn from training",
          "samples_at_real_depths_vs_real": "samples at the validation depths",
          "samples_given_real_layouts_vs_real": "samples given validation layouts, depths"}


def judge_samples(generated, real: dataset.Split, test: dataset.Split, n: int, draws: int, seed: int,
                  known: dict, depths=None, vqvae=None, layout_levels: int = 0, diagnostics: bool = False,
                  judges: int = C2ST_JUDGES) -> tuple:
    """The C2ST of samples against the real test slices, beside real validation slices (the ideal), over `draws`
    draws of n. generated(n, positions, stream, layouts) -> decoded samples; depths.draw(n) -> depths to sample at
    (None: an unconditioned prior). The samples judged are drawn at the judged real slices' depths where both the
    prior and the slices have depths, else at depths drawn from training (or none). `known`: results measured
    before (real vs real, reconstructions), not measured again. diagnostics: also samples at depths drawn from
    training, the VQ-VAE's reconstructions (`vqvae`) and, with two levels, codes given real layouts. judges: per fold
    (c2st).
    Returns (results by set, the real slices judged (one array per draw), the judged samples (one array per draw),
    and the samples at the real slices' depths with those depths (all draws together; None without depths))."""
    picks = [np.random.default_rng([seed, r]).permutation(len(real.images))[:n] for r in range(draws)]
    subjects = real.subjects()
    real_images, real_subjects = [real.images[p] for p in picks], [subjects[p] for p in picks]

    def drawn(stream: int, positions=None, layouts=None) -> list[np.ndarray]:
        """Every draw's n samples from one sampler call (one batch of n x draws samples is faster than draws
        batches of n), split into the draws; positions and layouts: one array per draw, or None."""
        joined = generated(n * draws, None if positions is None else np.concatenate(positions), stream=stream,
                           layouts=None if layouts is None else np.concatenate(layouts))
        return np.split(joined, draws)

    real_depths = [real.positions[p] for p in picks] if depths is not None and real.positions is not None else None
    judged, at_depths = {}, None  # samples: independent draws, each its own group
    if real_depths is not None:  # the test: as many samples as real slices, at the same depths
        judged["samples_at_real_depths_vs_real"] = (drawn(2, real_depths), None)
        at_depths = np.concatenate(judged["samples_at_real_depths_vs_real"][0]), np.concatenate(real_depths)
    if real_depths is None or diagnostics:  # without depths to match (or also): depths drawn from training, if any
        judged["samples_vs_real"] = (drawn(1, None if depths is None else [depths.draw(n) for _ in range(draws)]),
                                     None)
    samples = next(iter(judged.values()))[0]
    if "real_vs_real" not in known:  # a subject's slices share a fold (c2st)
        judged["real_vs_real"] = (real_images, real_subjects)
    if diagnostics and "reconstructions_vs_real" not in known:
        judged["reconstructions_vs_real"] = ([reconstruct(vqvae, images)[0] for images in real_images],
                                             real_subjects)
    if diagnostics and layout_levels:  # which level falls short: codes given real layouts
        layouts = [code_layouts(vqvae, batched(vqvae.encode, images), layout_levels) for images in real_images]
        judged["samples_given_real_layouts_vs_real"] = (drawn(3, real_depths, layouts), None)
    return report(judged, test, seed, known, judges), real_images, samples, at_depths


def report(judged: dict, test: dataset.Split, seed: int, known: dict, judges: int = C2ST_JUDGES) -> dict:
    """C2ST accuracy of each (draws of images, their subject ids or None) set against the real test slices, beside
    the `known` results measured before, printed as a table."""
    size = min(C2ST_SIZE, test.images.shape[1])
    print(f"realism: can a small CNN tell these from real test slices? (classifier two-sample test, "
          f"{C2ST_FOLDS}-fold, {judges} judge{'s' * (judges > 1)} a fold, at {size} px; 0.5 = indistinguishable, "
          "1.0 = always told apart)")
    results, test_subjects = dict(known), test.subjects()
    for name, (draws, subjects) in judged.items():
        results[name] = c2st(draws, test.images, groups=(subjects, test_subjects), seed=seed, judges=judges)
    for name in LABELS:
        if name in results:
            result = results[name]
            low, high = result["ci95"]
            each = f"draws {' '.join(f'{a:.2f}' for a in result['draws'])}; " if len(result["draws"]) > 1 else ""
            alone = result.get("judges_alone", [])  # older metrics.json have none
            each += f"judges alone {' '.join(f'{a:.2f}' for a in alone)}; " if len(alone) > 1 else ""
            p = f", p {result['p_value']:.2g}" if "p_value" in result else ""  # older metrics.json have none
            print(f"{LABELS[name]:>46}  accuracy {result['accuracy']:.3f}  [{low:.3f}, {high:.3f}]  ({each}"
                  f"{result['n_per_set']} per set{p}{', measured before' if name in known else ''})")
    return results


def data_stamp(held_out: list[np.ndarray], train_files: list[str]) -> str:
    """A fingerprint of what the references read: the held-out images themselves and the training files' names and
    sizes (the copy check's pool), so that a data folder rebuilt in place is noticed."""
    digest = hashlib.sha256()
    for images in held_out:
        digest.update(np.ascontiguousarray(images).tobytes())
    for path in train_files:
        digest.update(f"{Path(path).name} {Path(path).stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def reference(n: int, draws: int, seed: int, data_dir: str, vqvae_stamp: list, data: str,
              judges: int = C2ST_JUDGES) -> dict:
    """What the references (real vs real, reconstructions, the real side of the copy check) depend on: the data
    (its folder and `data`, its data_stamp), the VQ-VAE and the judge. Another of any of these: they are measured
    anew."""
    return {"n": n, "draws": draws, "seed": seed, "data_dir": str(data_dir), "data": data, "vqvae": vqvae_stamp,
            "judge": {"channels": list(JUDGE_CHANNELS), "folds": C2ST_FOLDS, "epochs": C2ST_EPOCHS,
                      "judges": judges, "size": C2ST_SIZE, "input": "8-bit"},
            "copy_shortlist": COPY_SHORTLIST}


def previous_references(previous: dict, reference: dict) -> tuple[dict, dict | None]:
    """What an earlier predict.py (its metrics.json `samples` section) measured on the same reference that does not
    depend on the prior: the real-vs-real and reconstruction C2STs, and the real slices' side of the copy check."""
    if previous.get("c2st_reference") != reference:
        return {}, None
    known = {name: previous["c2st"][name] for name in ("real_vs_real", "reconstructions_vs_real")
             if name in previous.get("c2st", {})}
    return known, previous.get("nearest_train_ssim", {}).get("real")


def copy_check(samples: np.ndarray, real: np.ndarray, train_images: np.ndarray, known_real: dict | None = None) -> dict:
    """Nearest-training-slice SSIM of samples and of real held-out slices (`known_real` if measured before):
    samples are copies if theirs is higher."""
    result = {"samples": summarize(nearest_ssim(samples, train_images, COPY_SHORTLIST)),
              "real": known_real or summarize(nearest_ssim(real, train_images, COPY_SHORTLIST))}
    verdict = "not copies" if result["samples"]["mean"] < result["real"]["mean"] else "closer to training slices " \
        "than real held-out slices are: possibly copies"
    print(f"copy check, mean SSIM to the nearest training slice: samples {result['samples']['mean']:.3f}, real "
          f"held-out slices {result['real']['mean']:.3f} ({verdict})")
    return result


# ---------------------------------------------------------------------------------------------------------------
# The tissue report: where the tissues of generated slices lie and what shape they take, against real slices
# ---------------------------------------------------------------------------------------------------------------

TISSUES = modules.TISSUES[1:]  # csf, gray, white: the classes 1, 2, 3 of a label map (0 is background)
BANDS = 5  # depth bands of the report: 0-0.2 (temporal lobes, cerebellum) ... 0.8-1.0 (the upper cortex)
MIN_PIECE = 4  # pixels: smaller pieces of a tissue are speckle of the segmenter, not anatomy; not counted
SHAPES = ("pieces", "largest", "boundary")  # the per-slice shape statistics (tissue_statistics)


def segment(segmenter, images: np.ndarray) -> np.ndarray:
    """(N, S, S, 1) slices -> (N, S, S) uint8 tissue classes, the segmenter's most likely per pixel."""
    return batched(lambda batch: keras.ops.argmax(segmenter(batch), axis=-1), images).astype(np.uint8)


def dice(predicted: np.ndarray, true: np.ndarray) -> dict:
    """Dice overlap 2|A n B| / (|A| + |B|) of each tissue, over all the slices together."""
    return {tissue: float(2 * np.sum((predicted == c) & (true == c))
                          / max(np.sum(predicted == c) + np.sum(true == c), 1))
            for c, tissue in enumerate(TISSUES, start=1)}


def shape_of(labels: np.ndarray) -> dict:
    """One slice's tissue shape: for each tissue the number of its connected pieces (4-connected, of at least
    MIN_PIECE px) and its largest piece as a share of the brain; and the share of brain pixels on a tissue
    boundary (a 4-neighbour of another class). A blotchy interior breaks white matter into many pieces."""
    brain = max(int(np.sum(labels > 0)), 1)
    result = {}
    for c, tissue in enumerate(TISSUES, start=1):
        pieces, count = ndimage.label(labels == c)
        sizes = np.bincount(pieces.ravel())[1:]
        result[f"{tissue}_pieces"] = int(np.sum(sizes >= MIN_PIECE))
        result[f"{tissue}_largest"] = float(sizes.max() / brain) if count else 0.0
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    result["boundary"] = float(np.sum(edge & (labels > 0)) / brain)
    return result


def tissue_statistics(images: np.ndarray, labels: np.ndarray, positions: np.ndarray) -> list[dict | None]:
    """Per depth band (BANDS of [0, 1]): the slices' mean tissue fractions of the brain, mean intensity of each
    tissue (gray/white contrast), mean tissue maps (the share of slices with that tissue at each pixel) and the
    per-slice shape statistics (shape_of), as lists; None for a band without slices."""
    band = depth_bands(positions, BANDS)
    bands = []
    for b in range(BANDS):
        mine = np.flatnonzero(band == b)
        if not len(mine):
            bands.append(None)
            continue
        lab, img = labels[mine], images[mine, ..., 0]
        brain = np.maximum(np.sum(lab > 0, axis=(1, 2)), 1)
        shapes = [shape_of(l) for l in lab]
        bands.append({
            "slices": len(mine),
            "fraction": {t: float(np.mean(np.sum(lab == c, axis=(1, 2)) / brain)) for c, t in enumerate(TISSUES, 1)},
            "intensity": {t: float(img[lab == c].mean()) if np.any(lab == c) else 0.0
                          for c, t in enumerate(TISSUES, 1)},
            "maps": np.stack([np.mean(lab == c, axis=0) for c in range(len(TISSUES) + 1)]),  # (4, S, S)
            "shapes": {key: [s[key] for s in shapes] for key in shapes[0]}})
    return bands


def tissue_errors(generated: list, real: list) -> dict:
    """How far the tissue statistics of one set lie from another's, over the bands both have:
    tissue_fraction_error, the mean absolute difference of the tissue fractions (over bands and tissues);
    tissue_map_error, the mean absolute difference of the mean tissue maps inside the brain (where either set has
    brain in at least 5% of its slices); shape_error, the mean relative difference of the mean shape statistics
    (|generated - real| / real, over bands, tissues and statistics)."""
    fraction, maps, shape = [], [], []
    for g, r in zip(generated, real):
        if g is None or r is None:
            continue
        fraction += [abs(g["fraction"][t] - r["fraction"][t]) for t in TISSUES]
        inside = (1 - g["maps"][0] > 0.05) | (1 - r["maps"][0] > 0.05)
        maps.append(float(np.abs(g["maps"][1:] - r["maps"][1:])[:, inside].mean()) if inside.any() else 0.0)
        shape += [abs(np.mean(g["shapes"][k]) - np.mean(r["shapes"][k])) / max(abs(np.mean(r["shapes"][k])), 1e-3)
                  for k in r["shapes"]]
    return {"tissue_fraction_error": float(np.mean(fraction)), "tissue_map_error": float(np.mean(maps)),
            "shape_error": float(np.mean(shape))}


def band_summary(stats: list) -> list:
    """The JSON-able part of tissue_statistics: per band, fractions, intensities and each shape statistic's mean
    and quartiles."""
    return [None if s is None else {
        "slices": s["slices"], "fraction": s["fraction"], "intensity": s["intensity"],
        "shapes": {k: {"mean": float(np.mean(v)), "quartiles": [float(q) for q in np.percentile(v, [25, 50, 75])]}
                   for k, v in s["shapes"].items()}} for s in stats]


# What each shape statistic is called in the report, and how its values read ("share": a share of the brain).
STATISTIC_NAMES = {"csf_pieces": ("CSF pieces", "count"), "csf_largest": ("largest CSF piece", "share"),
                   "gray_pieces": ("gray matter pieces", "count"), "gray_largest": ("largest gray piece", "share"),
                   "white_pieces": ("white matter pieces", "count"), "white_largest": ("largest white piece", "share"),
                   "boundary": ("brain on a tissue boundary", "share"), "csf_fraction": ("CSF", "share"),
                   "gray_fraction": ("gray matter", "share"), "white_fraction": ("white matter", "share")}
FAILURES_PER_BAND = 3


def where_samples_fail(generated: list, validation: list, test: list, top: int = FAILURES_PER_BAND) -> list:
    """Per depth band, the `top` statistics (tissue fractions and shape_of's means) on which the samples stand
    furthest from the real test slices, beyond what real validation slices differ by: ranked by
    (|generated - test| - |validation - test|) / |test|. Each entry: {"statistic", "generated", "test",
    "validation"}; a band is [] where the samples are no further than the floor on any statistic, None without
    slices."""
    report = []
    for g, v, t in zip(generated, validation, test):
        if g is None or v is None or t is None:
            report.append(None)
            continue
        values = {key: [float(np.mean(s["shapes"][key])) for s in (g, v, t)] for key in t["shapes"]}
        values.update({f"{tissue}_fraction": [s["fraction"][tissue] for s in (g, v, t)] for tissue in TISSUES})
        ranked = []
        for name, (gen, val, real) in values.items():
            excess = (abs(gen - real) - abs(val - real)) / max(abs(real), 1e-3)
            if excess > 0:
                ranked.append((excess, {"statistic": name, "generated": gen, "test": real, "validation": val}))
        report.append([entry for _, entry in sorted(ranked, key=lambda pair: -pair[0])[:top]])
    return report


def describe_failure(entry: dict) -> str:
    """'white matter pieces 10.9 (real 4.0, validation 4.4)' for one where_samples_fail entry."""
    name, kind = STATISTIC_NAMES.get(entry["statistic"], (entry["statistic"].replace("_", " "), "share"))
    show = (lambda x: f"{x:.1f}") if kind == "count" else (lambda x: f"{100 * x:.1f}%")
    return f"{name} {show(entry['generated'])} (real {show(entry['test'])}, validation {show(entry['validation'])})"


def print_tissue_report(section: dict, errors: dict) -> None:
    """Prints a tissue report's Dice, its errors (`errors`: their names and values) beside their floor, and where the
    samples fail per depth band."""
    floor = section["floor"]
    print("tissue report (segmented by the run's segmenter; the floor: real validation vs real test slices):")
    if section["segmenter_dice"]:
        print("  segmenter Dice on the real test slices: "
              + ", ".join(f"{t} {v:.3f}" for t, v in section["segmenter_dice"].items()))
    for key in errors:
        print(f"  {key:>22}  samples {errors[key]:.4f}  floor {floor[key]:.4f}  "
              f"({errors[key] / max(floor[key], 1e-9):.1f}x)")
    print("  where the samples stand furthest from the real test slices, per depth band (beyond real validation):")
    for band, entries in enumerate(section["where_samples_fail"]):
        if entries is not None:
            print(f"    depth {band / BANDS:.1f}-{(band + 1) / BANDS:.1f}: "
                  + ("; ".join(map(describe_failure, entries)) or "no statistic beyond real validation's"))


def tissue_report(segmenter, generated: tuple, validation: tuple, test: tuple, test_labels: np.ndarray | None,
                  verbose: bool = True) -> tuple:
    """The tissue report of generated slices: each set (images, depths) is segmented by the run's segmenter and
    compared with the real test slices, beside the floor (real validation slices against the same test slices).
    test_labels: the test slices' true segmentations (the segmenter's Dice, its known answer). Returns (the
    metrics' `anatomy` section, the statistics per set for the figure), and prints the report unless verbose is
    False (for a caller whose sets play other roles, which would make the printed names wrong)."""
    sets = {"generated": generated, "validation": validation, "test": test}
    labels = {name: segment(segmenter, images) for name, (images, _) in sets.items()}
    stats = {name: tissue_statistics(images, labels[name], depths) for name, (images, depths) in sets.items()}
    errors, floor = tissue_errors(stats["generated"], stats["test"]), tissue_errors(stats["validation"], stats["test"])
    failures = where_samples_fail(stats["generated"], stats["validation"], stats["test"])
    section = {"segmenter_dice": None if test_labels is None else dice(labels["test"], test_labels), **errors,
               "floor": floor, "bands": {name: band_summary(s) for name, s in stats.items()},
               "where_samples_fail": failures}
    if verbose:
        print_tissue_report(section, errors)
    return section, {**stats, "labels": labels}
