"""Files -> tensors: every accepted layout loads; every bad input is one clear line and exit code 2; the demo
builder is deterministic and never splits a subject."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
import train
from conftest import TINY, brainish, run_script, write_png
from utils import UserError

OASIS = {"keras_png_slices_train": 3, "keras_png_slices_validate": 2, "keras_png_slices_test": 2,
         "keras_png_slices_seg_train": 3}


@pytest.mark.parametrize("layout, counts", [
    ("oasis", OASIS),
    ("oasis-parent", OASIS),
    ("plain", {"train": 3, "validate": 2, "test": 2}),
    ("plain-val", {"train": 3, "val": 2, "test": 2}),
])
def test_each_layout_loads_with_right_shapes_and_range(png_tree, tmp_path, layout, counts):
    root = tmp_path / "data"
    png_tree(counts, root=root / "OASIS" if layout == "oasis-parent" else root)
    for split, n in [("train", 3), ("validate", 2), ("test", 2)]:
        files = dataset.split_files(root, split)
        assert len(files) == n and all("seg" not in Path(f).parent.name for f in files)
        images = dataset.load_images(files, image_size=32)
        assert images.shape == (n, 32, 32, 1) and images.dtype == np.float32
        assert images.min() == 0.0 and 0.5 < images.max() <= 1.0


def test_pipeline_batches_pairs_and_caches_every_file(png_tree):
    root = png_tree({"train": 5})
    files = dataset.split_files(root, "train")
    ds = dataset.make_dataset(files, image_size=16, batch_size=2, shuffle=True, seed=0)
    for f in files:  # the cache was filled when the pipeline was made: the files are no longer needed
        Path(f).unlink()
    batches = list(ds)
    assert [len(x) for x, _ in batches] == [2, 2, 1]
    for x, y in batches:
        assert x.shape[1:] == (16, 16, 1)
        np.testing.assert_array_equal(x.numpy(), y.numpy())

    assert ds.options().autotune.enabled is False  # its new iterator per epoch stalled (dataset._from_memory)


def test_array_pipeline_keeps_input_lists_and_target_dicts_and_deals_each_row_once_per_epoch():
    codes = np.arange(5 * 2 * 2).reshape(5, 2, 2)
    condition = np.arange(5 * 3, dtype="float32").reshape(5, 3)
    layout = np.arange(5)[:, None, None] * np.ones((1, 1, 1), int)
    ds = dataset.array_dataset([codes, condition, layout], {"codes": codes, "layout": layout}, batch_size=2,
                               shuffle=True, seed=3)
    assert ds.options().autotune.enabled is False
    epochs = [list(ds) for _ in range(2)]
    orders = []
    for batches in epochs:
        assert [len(targets["codes"]) for _, targets in batches] == [2, 2, 1]
        order = []
        for (x_codes, x_condition, x_layout), targets in batches:  # one tuple of three inputs, not a stacked tensor
            rows = x_codes.numpy()[:, 0, 0] // 4
            np.testing.assert_array_equal(x_condition.numpy(), condition[rows])
            np.testing.assert_array_equal(x_layout.numpy(), layout[rows])
            np.testing.assert_array_equal(targets["codes"].numpy(), codes[rows])
            order += list(rows)
        assert sorted(order) == list(range(5))
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled each epoch
    same_seed = dataset.array_dataset([codes, condition, layout], {"codes": codes, "layout": layout}, batch_size=2,
                                      shuffle=True, seed=3)
    assert [r for (x, _, _), _ in same_seed for r in x.numpy()[:, 0, 0] // 4] == orders[0]  # seeded
    in_order = dataset.array_dataset(codes, codes, batch_size=2)
    assert [r for x, _ in in_order for r in x.numpy()[:, 0, 0] // 4] == list(range(5))


def test_array_pipeline_passes_are_epochs_in_one_iteration():
    rows = np.arange(5)
    passes = list(dataset.array_dataset(rows, rows, batch_size=2, shuffle=True, seed=3, passes=3))
    assert [len(x) for x, _ in passes] == [2, 2, 1] * 3  # each pass ends in its own partial batch
    orders = [np.concatenate([x.numpy() for x, _ in passes[3 * k:3 * k + 3]]) for k in range(3)]
    assert all(sorted(order) == list(range(5)) for order in orders)  # every row once per pass
    assert len({tuple(order) for order in orders}) > 1  # reshuffled between passes
    one_pass = [r for x, _ in dataset.array_dataset(rows, rows, batch_size=2, shuffle=True, seed=3) for r in x.numpy()]
    assert list(orders[0]) == one_pass  # the first pass is the one-pass pipeline's epoch


def test_eight_bit_scaled_by_255_rgb_to_gray_sixteen_bit_by_own_range_sizes_resized(tmp_path):
    gray = np.full((32, 32), 51, np.uint8)
    write_png(tmp_path / "gray.png", gray)
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 1] = 255
    write_png(tmp_path / "rgb.png", rgb)
    rgba = np.dstack([np.full((32, 32, 3), 102, np.uint8), np.full((32, 32), 255, np.uint8)])
    write_png(tmp_path / "rgba.png", rgba)
    sixteen = brainish(32, dtype=np.uint16, value=4000)
    write_png(tmp_path / "sixteen.png", sixteen)
    write_png(tmp_path / "big.png", np.full((64, 48), 255, np.uint8))
    names = ["gray", "rgb", "rgba", "sixteen", "big"]
    images = dataset.load_images([str(tmp_path / f"{n}.png") for n in names], image_size=32)
    assert images.shape == (5, 32, 32, 1)
    np.testing.assert_allclose(images[0], 51 / 255, atol=1e-6)
    np.testing.assert_allclose(images[1], 0.587, atol=0.01)  # ITU-R 601 luma of pure green
    np.testing.assert_allclose(images[2], 102 / 255, atol=0.01)
    expected = (sixteen - sixteen.min()) / (sixteen.max() - sixteen.min())
    np.testing.assert_allclose(images[3][..., 0], expected, atol=1e-5)
    np.testing.assert_allclose(images[4], 1.0, atol=1e-5)


def user_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path):
    assert "does not exist" in user_error(lambda: dataset.find_splits(tmp_path / "nope"))


def test_no_split_folders(tmp_path):
    (tmp_path / "random").mkdir()
    assert "no split folders" in user_error(lambda: dataset.find_splits(tmp_path))


def test_empty_split(png_tree):
    root = png_tree({"train": 2})
    (root / "validate").mkdir()
    assert re.search(r"validate contains no \.png", user_error(lambda: dataset.split_files(root, "validate")))
    assert "no test split" in user_error(lambda: dataset.split_files(root, "test"))


@pytest.mark.parametrize("content", [b"this is not an image", "truncated"])
def test_corrupt_png_is_named(png_tree, content):
    root = png_tree({"train": 4})
    bad = root / "train" / "case_002_slice_0.nii.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    files = dataset.split_files(root, "train")
    message = user_error(lambda: dataset.load_images(files, 32))
    assert str(bad) in message and "PNG" in message
    message = user_error(lambda: dataset.make_dataset(files, 32, 2, shuffle=False))
    assert str(bad) in message


def test_train_cli_reports_bad_data_in_one_line_with_exit_2_and_creates_no_run(tmp_path, png_tree):
    root = png_tree({"train": 2, "validate": 1})
    (root / "validate" / "case_000_slice_0.nii.png").write_bytes(b"oops")
    result = run_script(["--data-dir", str(root), "--image-size", "16", "--runs-dir", str(tmp_path / "runs")],
                        cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "case_000_slice_0.nii.png" in line
    assert not (tmp_path / "runs").exists()
    # a quiet start: none of TensorFlow's C++ start-up lines ("failed call to cuInit" without a GPU), our words only
    assert result.stderr.splitlines() == [line]
    assert result.stdout.splitlines()[0] == "no GPU found: training runs on the CPU"


@pytest.mark.parametrize("args, expected", [
    (["--data-dir", "missing"], "missing does not exist"),
    ([], "data/oasis does not exist; pass --data-dir PATH"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--batch-size", "-1"], "--batch-size must be a positive integer"),
    (["--image-size", "30", "--downsample", "4"], "not divisible by --downsample"),
    (["--prior-attention-layers", "-1"], "--prior-attention-layers must be 0 or more"),
    (["--spectral-loss", "-0.1"], "--spectral-loss must be 0 or more"),
    (["--prior-layout-levels", "1"], "--prior-layout-levels must be 0 (one level) or at least 2"),
    (["--prior-condition-dropout", "1"], "--prior-condition-dropout must be at least 0 and below 1"),
    (["--prior-layout-levels", "4", "--image-size", "36"], "needs an even code grid"),
])
def test_train_main_rejects_bad_settings_with_exit_2(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def demo_files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(Path(root).rglob("*.png"))}


def test_demo_set_is_deterministic_oasis_shaped_and_keeps_subjects_in_one_split(demo_dir, tmp_path):
    full = demo_dir  # the same subjects and seed, every slice of the held-out subjects kept
    demo_dir = dataset.make_demo(tmp_path / "demo", subjects=(2, 1, 1), seed=0, verbose=False)
    again = dataset.make_demo(tmp_path / "again", subjects=(2, 1, 1), seed=0, verbose=False)
    files = demo_files(demo_dir)
    assert files == demo_files(again)  # same seed, same bytes
    cases = {}
    for split, n in zip(dataset.SPLITS, (2, 1, 1)):
        names = [p.name for p in (demo_dir / f"keras_png_slices_{split}").glob("*.png")]
        per_subject = dataset.DEMO_SLICES if split == "train" else dataset.DEMO_HELD_OUT_SLICES
        assert len(names) == n * per_subject
        assert all(re.fullmatch(r"case_\d{3}_slice_\d+\.nii\.png", name) for name in names)
        cases[split] = {name.split("_slice")[0] for name in names}
        assert len(list((demo_dir / f"keras_png_slices_seg_{split}").glob("*.png"))) == n * per_subject
    assert not (cases["train"] & cases["validate"]) and not (cases["train"] & cases["test"])
    assert not (cases["validate"] & cases["test"])
    images = dataset.load_images(dataset.split_files(demo_dir, "train"), 256)
    assert images.shape == (64, 256, 256, 1)
    brain = (images > 0.02).mean(axis=(1, 2, 3))
    assert 0.05 < brain.mean() < 0.6  # a brain on a black background, as OASIS slices are
    seg_values = {v for p in (demo_dir / "keras_png_slices_seg_test").glob("*.png")
                  for v in np.unique(np.asarray(Image.open(p)))}
    assert seg_values == {0, 85, 170, 255}
    # a held-out subject keeps slices spread from its first to its last, so its depths span [0, 1] as in training
    test_files = dataset.split_files(demo_dir, "test")
    np.testing.assert_allclose(np.sort(dataset.slice_positions(test_files)),
                               np.linspace(0, dataset.DEMO_SLICES - 1, dataset.DEMO_HELD_OUT_SLICES).round()
                               / (dataset.DEMO_SLICES - 1), atol=1e-6)
    # and those slices are the full subject's, byte for byte
    for path in test_files:
        assert Path(path).read_bytes() == (full / "keras_png_slices_test" / Path(path).name).read_bytes()


def test_demo_differs_with_seed(tmp_path):
    template = dataset.mni152_template()
    a = dataset.demo_subject(*template, np.random.default_rng([0, 1]))[0]
    b = dataset.demo_subject(*template, np.random.default_rng([1, 1]))[0]
    assert a.shape == (dataset.DEMO_SLICES, 256, 256) and np.mean(a != b) > 0.1


def test_demo_builder_refuses_a_non_empty_folder_and_leaves_it_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        dataset.make_demo(tmp_path, subjects=(1, 1, 1), verbose=False)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


@pytest.mark.slow  # trains a run
@pytest.mark.parametrize("kind", ["rgb", "sixteen_bit"])
def test_a_folder_of_rgb_or_16_bit_pngs_trains(tmp_path, kind):
    for split, n in [("train", 4), ("validate", 2)]:
        for i in range(n):
            gray = brainish(32, seed=i, dtype=np.uint16 if kind == "sixteen_bit" else np.uint8,
                            value=3000 if kind == "sixteen_bit" else None)
            write_png(tmp_path / "data" / split / f"case_{i}.png", np.dstack([gray] * 3) if kind == "rgb" else gray)
    args = ["--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"), "--name", kind,
            "--stage", "vqvae", "--epochs", "1", "--image-size", "32", "--hidden-channels", "4",
            "--num-res-blocks", "0", "--num-embeddings", "8", "--embedding-dim", "2", "--batch-size", "4"]
    assert train.main(args) == 0
    assert (tmp_path / "runs" / kind / "vqvae.keras").is_file()


def test_resume_of_a_missing_run_folder(tmp_path, capsys):
    assert train.main(["--resume", str(tmp_path / "nope"), "--stage", "prior"]) == 2
    err = capsys.readouterr().err
    assert "nope does not exist" in err and err.count("\n") == 1


def test_slice_positions_are_depths_within_each_subject():
    names = ["x/case_001_slice_0.nii.png", "x/case_001_slice_31.nii.png", "case_001_slice_10.nii.png",
             "case_002_slice_7.nii.png", "case_002_slice_9.nii.png", "case_003_slice_4.nii.png"]
    np.testing.assert_allclose(dataset.slice_positions(names), [0, 1, 10 / 31, 0, 1, 0.5])  # one slice: the middle
    assert list(dataset.slice_subjects(names)) == ["case_001"] * 3 + ["case_002"] * 2 + ["case_003"]
    assert dataset.slice_positions(["case_001_slice_0.nii.png", "scan_7.png"]) is None  # one name without a number
    assert dataset.slice_subjects(["img.png"]) is None


@pytest.mark.slow
def test_names_without_slice_numbers_train_an_unconditional_prior(tmp_path, capsys):
    import predict
    from run_state import Run

    for split, n in [("train", 6), ("validate", 3), ("test", 3)]:
        for i in range(n):
            write_png(tmp_path / "data" / split / f"scan_{split}_{i}.png", brainish(32, seed=i))
    args = ["--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"), "--name", "plain",
            "--epochs", "1", "--prior-epochs", "1", *TINY]
    assert train.main(args) == 0
    assert "file names carry no slice numbers" in capsys.readouterr().out
    run = Run.open(tmp_path / "runs" / "plain")
    assert run.read_config().prior_position_frequencies == 0
    assert run.stage("prior").load_model().num_conditions == 0
    assert predict.main(["--run", str(run.path), "--num-samples", "2", "--realism-samples", "3"]) == 0
    assert not run.figure("depths").exists()
    assert predict.main(["--run", str(run.path), "--slice-position", "0.5"]) == 2
    assert "not conditioned on depth" in capsys.readouterr().err


def test_shifted_code_batches_move_each_grid_and_its_layout_by_whole_steps_and_fill_the_uncovered_part():
    rng = np.random.default_rng(0)
    codes = rng.integers(1, 9, (6, 8, 8)).astype("int32")
    layout = codes.reshape(6, 4, 2, 4, 2)[:, :, 0, :, 0].copy()  # a layout cell per 2x2 codes: its top-left code
    condition = np.arange(6, dtype="float32")[:, None]
    seen = set()
    batches = dataset.shifted_code_batches({"codes": codes, "condition": condition, "layout": layout}, 2,
                                           {"codes": 0, "layout": 0}, batch_size=4, epoch_size=6, seed=1)
    for _ in range(5):  # epochs: other shifts each time
        for batch in batches:
            for moved, cells, which in zip(batch["codes"].numpy(), batch["layout"].numpy(),
                                           batch["condition"].numpy()[:, 0].astype(int)):
                shifts = [(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2)
                          if np.array_equal(moved, np.roll(np.pad(codes[which], 2), (dy, dx), (0, 1))[2:-2, 2:-2])]
                assert len(shifts) == 1, "each grid is its own, moved by one of the 9 shifts"
                (dy, dx), = shifts
                np.testing.assert_array_equal(cells, np.roll(np.pad(layout[which], 1), (dy // 2, dx // 2),
                                                             (0, 1))[1:-1, 1:-1])  # the layout moves with it
                seen.add((dy, dx))
    assert len(seen) >= 6  # the shifts vary


def test_a_config_written_before_augmentation_or_layouts_existed_trains_without_them():
    from run_state import Config

    assert Config.from_dict({}).prior_augment == 0 and Config().prior_augment == 2
    assert Config.from_dict({"prior_augment": 4}).prior_augment == 4
    assert Config.from_dict({}).prior_layout_levels == 0 and Config().prior_layout_levels == 8
    assert Config.from_dict({"prior_layout_levels": 5}).prior_layout_levels == 5


def test_the_prior_keeps_the_weights_of_its_best_validation_epoch(tmp_path):
    import keras

    import train
    from run_state import Config, Run

    run = Run(tmp_path / "run")
    run.path.mkdir()
    run.write_config(Config())
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    best = train.BestWeights()
    best.set_model(model)
    weights = []
    for epoch, loss in enumerate([3.0, 2.0, 4.0]):
        model.set_weights([np.full((2, 1), epoch, "float32"), np.zeros(1, "float32")])
        weights.append(model.get_weights())
        best.on_epoch_end(epoch, {"val_loss": loss})
    assert best.restore(model, run.stage("prior"), epochs=3) == 2
    np.testing.assert_array_equal(keras.saving.load_model(run.stage("prior").checkpoint).get_weights()[0],
                                  weights[1][0])
    assert run.stage("prior").epochs_done == 3


def test_a_subject_at_evenly_spread_depths_lowest_first(demo_dir):
    split = dataset.Split.load(demo_dir, "train", 32)  # two subjects of 32 slices, in file order
    subject, pick = split.subject_at_depths(8)
    subjects = split.subjects()
    assert subject == subjects[0] and (subjects[pick] == subject).all() and len(set(pick)) == 8
    depths = split.positions[pick]
    assert depths[0] == 0 and depths[-1] == 1 and (np.diff(depths) > 0).all()


@pytest.mark.parametrize("slices", [1, dataset.DEMO_SLICES + 1])
def test_demo_builder_refuses_held_out_subjects_of_too_few_or_too_many_slices(tmp_path, slices):
    with pytest.raises(UserError, match="held-out subjects need"):
        dataset.make_demo(tmp_path / "demo", subjects=(1, 1, 1), verbose=False, held_out_slices=slices)
    assert not (tmp_path / "demo").exists()
