"""The `imagenet` flow on your own images: a generated folder of class folders (odd sizes,
grayscale and PNG files, a nested folder, a class with one image, an empty class folder, stray
files, a .jpg that is not an image, names that are not ASCII) through listings, convert, mean,
alexnet_mini sized to its classes, evaluation, finetuning, and `imagenet classify` with the
user's class names. Adding or replacing an image reruns exactly what depends on it.

The tests share one data root and run in file order. One training, of 2 iterations, finetuned
from the weights of a 10-class alexnet_mini (training from scratch is the ILSVRC12 flow's path,
tests/flows/test_imagenet_flow.py): what is tested is the wiring.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data import image_folder
from tasks import convert as convert_tasks
from tasks.cache import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

PER_CLASS = 6
ITERATIONS = 2
DATA_STAGES = ["listings", "convert", "mean"]
ALL_STAGES = {"listings", "convert-train", "convert-val", "mean", f"train-0-{ITERATIONS}",
           "evaluate"}


def statuses(result: dict) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in result["stages"]}


def ran(result: dict) -> set[str]:
    return {name for name, status in statuses(result).items() if status == "ran"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> image_folder.SampleFolder:
    return image_folder.make_image_folder(tmp_path_factory.mktemp("own") / "garden",
                                          per_class=PER_CLASS)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("own_root")


def params(data_root: Path, photos, **overrides):
    from flows.imagenet import PipelineParams

    base = dict(data_root=str(data_root), images=str(photos.folder), net="alexnet_mini",
                max_iter=ITERATIONS, workers=1)
    return PipelineParams(**{**base, **overrides}).flow_parameters()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """Weights of the 10-class alexnet_mini (another dataset, its classifier named fc8)."""
    import jax

    from model.caffemodel import save_caffemodel
    from model.net import Net
    from model.zoo.recipes import RECIPES

    source = Net.from_prototxt(RECIPES["alexnet_mini"].folder / "deploy.prototxt", "TEST")
    path = tmp_path_factory.mktemp("pretrained") / "pretrained.caffemodel"
    save_caffemodel(path, source, source.init(jax.random.PRNGKey(3)))
    return path


@pytest.fixture(scope="module")
def first_run(data_root, photos, pretrained):
    from flows.imagenet import imagenet

    return imagenet(**params(data_root, photos, weights=str(pretrained)))


def test_folder_runs_the_same_stages_with_labels_and_a_sized_net(first_run, data_root, photos):
    assert ran(first_run) == ALL_STAGES == set(statuses(first_run))  # no download, no extract
    labels = (data_root / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert labels == ["circle", "lonely", "rayé", "square", "triangle"]
    listings = first_run["records"]["listings"]
    assert listings["classes"] == 5 and listings["empty_classes"] == 1
    notes = " | ".join(listings["notes"])
    for expected in ("a single image (lonely)", "left out of labels.txt (empty)",
                     "notes.txt", "circle/Thumbs.db", "circle/.DS_Store"):
        assert expected in notes
    # the .jpg that is not an image is listed, then skipped by convert (counted and named)
    train, val = first_run["datasets"]["train"], first_run["datasets"]["val"]
    assert train["skipped"] + val["skipped"] == 1
    assert train["count"] + val["count"] == listings["train"] + listings["val"] - 1
    skipped = (first_run["records"]["convert-train"]["skipped_examples"]
               + first_run["records"]["convert-val"]["skipped_examples"])
    assert len(skipped) == 1 and "triangle/broken.jpg" in skipped[0]
    # alexnet_mini at its 64x64 records, fc8 sized to the 5 classes under a new name
    assert read_manifest(convert_tasks.lmdb_path(data_root, "train"))["record"]["count"] > 0
    net = Path(first_run["outputs"]["final weights"]).parent / "train_val.prototxt"
    text = net.read_text(encoding="utf-8")
    assert 'name: "fc8_garden"' in text and "num_output: 5" in text
    assert first_run["top1"] is not None
    assert first_run["outputs"]["labels"] == str(data_root / "labels.txt")


def test_rerun_is_cached_and_adding_an_image_reruns_exactly_its_split(first_run, data_root,
                                                                       photos, pretrained):
    from flows.imagenet import imagenet

    again = imagenet(**params(data_root, photos, weights=str(pretrained)))
    assert ran(again) == set()
    before = {name: (data_root / name).read_bytes() for name in ("train.txt", "val.txt")}
    digests = {s: read_manifest(convert_tasks.lmdb_path(data_root, s))["digest"]
               for s in ("train", "val")}
    shutil.copy(photos.folder / photos.classes["square"][0],
                photos.folder / "square" / "another one.jpg")
    added = imagenet(**params(data_root, photos, stages=DATA_STAGES))
    changed = {s for s in ("train", "val")
               if (data_root / f"{s}.txt").read_bytes() != before[f"{s}.txt"]}
    assert changed  # the new image is in one of them
    want = {"listings"} | {f"convert-{s}" for s in changed} | ({"mean"} if "train" in changed
                                                                else set())
    assert ran(added) == want
    for split in {"train", "val"} - changed:
        assert read_manifest(convert_tasks.lmdb_path(data_root, split))["digest"] == \
            digests[split]
    # An image replaced in place (same name, other bytes) is converted again: only its split.
    val_image = next(line.rpartition(" ")[0] for line in
                     (data_root / "val.txt").read_text(encoding="utf-8").splitlines())
    target = photos.folder / val_image
    target.write_bytes((photos.folder / photos.classes["circle"][1]).read_bytes())
    replaced = imagenet(**params(data_root, photos, stages=DATA_STAGES))
    assert ran(replaced) == {"listings", "convert-val"}


def test_resize_mode_reconverts(first_run, data_root, photos):
    from flows.imagenet import imagenet

    cropped = imagenet(**params(data_root, photos, stages=DATA_STAGES, resize_mode="crop"))
    assert ran(cropped) == {"convert-train", "convert-val", "mean"}
    # left out, the mode is the one the data root's LMDBs were built with (as the sizes are)
    same = imagenet(**params(data_root, photos, stages=DATA_STAGES))
    assert ran(same) == set()
    back = imagenet(**params(data_root, photos, stages=DATA_STAGES, resize_mode="squash"))
    assert ran(back) == {"convert-train", "convert-val", "mean"}


def test_finetuning_copies_by_name_and_starts_the_new_classifier_fresh(first_run, data_root,
                                                                       pretrained):
    """Every layer but fc8 is copied from the 10-class weights; fc8_garden keeps its filler, at
    10x the lr_mult under a tenth of the base_lr (flickr_style); the weights are part of the
    configuration (from scratch would train in another folder)."""
    from tasks import train as training

    run_dir = Path(first_run["outputs"]["final weights"]).parent
    assert "base_lr: 0.0005" in (run_dir / "solver.prototxt").read_text()
    net = (run_dir / "train_val.prototxt").read_text()
    fc8 = net[net.index('name: "fc8_garden"'):]
    assert "lr_mult: 10" in fc8[:400] and "lr_mult: 20" in fc8[:400]
    lines = training.finetune_report(str(run_dir / "solver.prototxt"), str(pretrained))
    assert lines == [
        "copied by name from the weights: 7 layers (conv1, conv2, conv3, conv4, conv5, fc6, fc7)",
        "not in the weights, starting from their fillers: 1 layer (fc8_garden)",
        "in the weights but not in the net, ignored: 1 layer (fc8)"]
    lmdbs = {split: convert_tasks.lmdb_path(data_root, split) for split in ("train", "val")}
    common = dict(train_lmdb=lmdbs["train"], val_lmdb=lmdbs["val"],
                  mean_file=convert_tasks.mean_path(data_root), max_iter=ITERATIONS)
    solver = data_root / "nets" / "alexnet_mini" / "solver.prototxt"
    tuned = training.prepare_training(data_root, str(solver), weights=pretrained, **common)
    scratch = training.prepare_training(data_root, str(solver), **common)
    assert scratch.config_id != tuned.config_id and tuned.weights == str(pretrained.resolve())


def test_classify_needs_only_the_weights_and_prints_the_users_class_names(first_run, photos,
                                                                          capsys):
    """The inference bundle beside the weights holds the deploy net sized to the 5 classes,
    the mean, the scale, the records' size and resize mode, and labels.txt's names."""
    import json

    from flows.cli import main
    from model.bundle import find_bundle

    weights = first_run["outputs"]["final weights"]
    bundle = json.loads(find_bundle(weights).read_text())
    assert (bundle["classes"], bundle["image_hw"], bundle["resize_mode"]) == (5, [64, 64], "squash")
    image = photos.folder / photos.classes["rayé"][0]
    code = main(["classify", f"--weights={weights}", "--top_k=5", "--center_only", str(image)])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("circle", "lonely", "rayé", "square", "triangle"):
        assert name in out


def test_bad_folder_parameters_fail_in_one_line(data_root, photos, tmp_path):
    from flows.imagenet import imagenet

    state = imagenet(**params(tmp_path / "r", photos, images=str(tmp_path / "missing")),
                     return_state=True)
    assert state.is_failed() and state.message.startswith("stage listings: ")
    assert "no such folder" in state.message
    from flows.imagenet import PipelineParams

    with pytest.raises(ValueError, match="give net .* or solver"):
        PipelineParams(images=str(photos.folder), net="alexnet_mini", solver="x/solver.prototxt")
    with pytest.raises(ValueError, match="val_percent splits the images folder"):
        PipelineParams(val_percent=10)
    # without net or solver, your own images train the default solver's net sized to them
    assert PipelineParams(images=str(photos.folder)).zoo_net() == "bvlc_alexnet"
    assert PipelineParams(images="x", solver="my/solver.prototxt").zoo_net() is None
    assert PipelineParams().zoo_net() is None  # ILSVRC12 with the default solver, as it is
