"""The tissue report: the segmenter, its statistics, and known answers (real slices near the floor; slices with
shuffled interiors or blurred by the code grid's factor far from it)."""

import numpy as np
import pytest

import dataset
import modules
import train as train_module
import realism
import run_state
import utils
from conftest import BACKEND


def test_the_segmenter_keeps_the_image_size_and_round_trips(tmp_path):
    import keras

    config = run_state.Config(image_size=32, segmenter_channels=4, segmenter_epochs=1)
    model = modules.new_segmenter(config, steps_per_epoch=1)
    assert model.channels == (4, 8, 16)
    x = np.random.default_rng(0).random((2, 32, 32, 1)).astype("float32")
    assert model(x).shape == (2, 32, 32, 4)
    model.save(tmp_path / "s.keras")
    np.testing.assert_allclose(keras.saving.load_model(tmp_path / "s.keras")(x), model(x), atol=1e-5)
    odd = modules.new_segmenter(run_state.Config(image_size=30, segmenter_channels=4), 1)  # halves once only
    assert odd.channels == (4, 8) and odd(np.zeros((1, 30, 30, 1), "float32")).shape == (1, 30, 30, 4)


def test_tissue_labels_are_read_beside_the_slices(demo_dir):
    files = dataset.split_files(demo_dir, "test")
    labels = dataset.load_tissue(dataset.tissue_files(files)[:4], 64)
    assert labels.shape == (4, 64, 64) and set(np.unique(labels)) <= {0, 1, 2, 3}
    images = dataset.load_images(files[:4], 64)[..., 0]
    assert np.mean(images[labels == 0]) < 0.05 < np.mean(images[labels == 3])  # background dark, white matter not
    assert np.mean(images[labels == 3]) > np.mean(images[labels == 2]) > np.mean(images[labels == 1])  # T1 contrast
    assert dataset.tissue_files([str(demo_dir / "elsewhere" / "case_001_slice_0.nii.png")]) is None


def test_dice_and_shape_statistics_by_hand():
    labels = np.zeros((10, 10), np.uint8)
    labels[1:9, 1:9] = 2  # gray matter square
    labels[3:7, 3:7] = 3  # white matter inside it
    labels[1:3, 7:9] = 1  # a CSF corner of 4 px (kept) ...
    labels[8, 1] = 1  # ... and a CSF speck of 1 px (not counted)
    shape = realism.shape_of(labels)
    assert shape["white_pieces"] == 1 and shape["csf_pieces"] == 1 and shape["gray_pieces"] == 1
    assert shape["white_largest"] == pytest.approx(16 / 64)
    split = labels.copy()
    split[4:6, 3:7] = 2  # white matter cut in two
    assert realism.shape_of(split)["white_pieces"] == 2
    assert realism.dice(labels, labels) == {"csf": 1.0, "gray": 1.0, "white": 1.0}
    assert realism.dice(split, labels)["white"] == pytest.approx(2 * 8 / (8 + 16))


def band(white_pieces, white_fraction=0.4, csf_largest=0.02):
    """One depth band of tissue_statistics, reduced to what where_samples_fail reads (one slice)."""
    return {"fraction": {"csf": 0.1, "gray": 0.9 - white_fraction, "white": white_fraction},
            "shapes": {"white_pieces": [white_pieces], "csf_largest": [csf_largest]}}


def test_where_samples_fail_ranks_the_statistics_beyond_the_floor():
    test = [band(4.0), band(6.0), None]
    validation = [band(4.4), band(6.5, csf_largest=0.03), band(5.0)]
    generated = [band(11.0, csf_largest=0.01), band(6.2, white_fraction=0.6, csf_largest=0.021), band(9.0)]
    report = realism.where_samples_fail(generated, validation, test, top=2)
    assert report[2] is None  # no real test slices in that band
    first, second = report[0]
    # white pieces 11 against 4 (floor 0.4): (7 - 0.4) / 4 = 1.65; the largest CSF piece 0.01 against 0.02: 0.5
    assert (first["statistic"], first["generated"], first["test"], first["validation"]) == ("white_pieces", 11, 4, 4.4)
    assert second["statistic"] == "csf_largest"
    # band 1: white matter 0.6 against 0.4 (gray follows it); the white pieces and the CSF piece lie within the floor
    assert {e["statistic"] for e in report[1]} == {"white_fraction", "gray_fraction"}
    assert realism.describe_failure(first) == "white matter pieces 11.0 (real 4.0, validation 4.4)"
    assert realism.describe_failure(second) == "largest CSF piece 1.0% (real 2.0%, validation 2.0%)"
    assert realism.where_samples_fail(test, test, test) == [[], [], None]  # real against itself: nothing fails


@pytest.mark.slow
def test_the_tissue_report_puts_real_slices_at_the_floor_and_broken_ones_far_from_it(demo_dir):
    """A segmenter trained on the tiny demo set's training slices reads real validation slices as the real test
    slices' peers, and slices with shuffled interiors or blurred by 4 (the code grid's factor) as far from them."""
    import keras

    train, val, test = (dataset.Split.load(demo_dir, name, 64) for name in dataset.SPLITS)
    keras.utils.set_random_seed(0)
    config = run_state.Config(image_size=64, segmenter_channels=8, segmenter_epochs=15, segmenter_learning_rate=5e-3)
    segmenter = modules.new_segmenter(config, steps_per_epoch=4, class_weights=train_module.class_weights(
        train.tissue()))
    segmenter.fit(train.images, train.tissue().astype("int32"), batch_size=16, epochs=15, verbose=0)
    dice = realism.dice(realism.segment(segmenter, test.images), test.tissue())
    assert dice["gray"] > 0.5 and dice["white"] > 0.5  # (CSF, a few pixels a slice at 64 px, takes longer)
    real = (val.images, val.positions)
    shuffled = (realism.interior_shuffled(val.images, np.random.default_rng(0), patch=4), val.positions)
    blurred = (utils.bilinear_baseline(val.images, 4), val.positions)
    reports = {name: realism.tissue_report(segmenter, images, real, (test.images, test.positions), test.tissue())[0]
               for name, images in (("real", real), ("shuffled", shuffled), ("blurred", blurred))}
    floor = reports["real"]["floor"]
    assert reports["real"]["shape_error"] == pytest.approx(floor["shape_error"])  # the same sets: the floor
    # measured: shuffled 4.0x the floor, blurred 1.4x (at 64 px, blurred by 4: on the demo at 128 px, 2.4x)
    assert reports["shuffled"]["shape_error"] > 2 * floor["shape_error"]
    assert reports["blurred"]["shape_error"] > 1.2 * floor["shape_error"]
    assert len(reports["real"]["bands"]["generated"]) == realism.BANDS
    assert all(band == [] for band in reports["real"]["where_samples_fail"] if band is not None)  # real: the floor
    named = {e["statistic"] for band in reports["shuffled"]["where_samples_fail"] if band for e in band}
    assert named & {"white_pieces", "gray_pieces", "csf_pieces"}  # shuffled interiors break tissue into pieces
