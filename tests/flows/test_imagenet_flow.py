"""The `imagenet` flow on a tiny mini-ILSVRC12 mirror served over HTTP, with a tiny net: stages
rerun exactly when their inputs, parameters or outputs say so, and training resumes from the
newest snapshot after an injected failure or a SIGKILL.

The tests share one data root and run in file order: each leaves it complete for the base
parameters, so every test starts from "everything cached".
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks import convert as convert_tasks
from tasks.cache import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

ALL_STAGES = {"download-train", "download-val", "download-aux", "extract-train", "extract-val",
              "listings", "convert-train", "convert-val", "mean", "train-0-2", "train-2-4",
              "train-4-6", "evaluate"}
REPO = Path(__file__).resolve().parents[2]
KILL_WAIT_S = 300
API_CATCH_UP_S = 30


def statuses(result: dict) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in result["stages"]}


def ran(result: dict) -> set[str]:
    return {name for name, status in statuses(result).items() if status == "ran"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_root")


@pytest.fixture(scope="module")
def first_run(data_root, make_params):
    from flows.imagenet import imagenet

    return imagenet(**make_params(data_root).flow_parameters())


def test_full_flow_then_everything_cached(first_run, data_root, make_params):
    from flows.imagenet import imagenet

    assert set(statuses(first_run)) == ALL_STAGES
    assert ran(first_run) == ALL_STAGES
    assert first_run["datasets"]["train"]["count"] == 18 - first_run["datasets"]["train"]["skipped"]
    assert first_run["datasets"]["val"]["count"] == 9
    assert 0.0 <= first_run["top1"] <= first_run["top5"] <= 1.0
    assert [row["iter"] for row in first_run["test_rows"]] == [0, 2, 4, 6]
    assert Path(first_run["outputs"]["final weights"]).is_file()
    # what classify needs lies beside the weights, and the data root links the newest model
    latest = data_root / "training" / "latest.caffemodel"
    assert latest.resolve() == Path(first_run["outputs"]["final weights"]).resolve()
    assert Path(first_run["outputs"]["inference bundle"]).is_file()

    start = time.monotonic()
    second = imagenet(**make_params(data_root).flow_parameters())
    no_op_seconds = time.monotonic() - start
    print(f"no-op rerun of the whole flow: {no_op_seconds:.1f} s")  # reported, not asserted
    assert statuses(second) == {name: "cached" for name in ALL_STAGES}
    assert second["top1"] == first_run["top1"] and second["top5"] == first_run["top5"]


def test_classify_answers_with_the_trained_model_alone(first_run, data_root, capsys):
    """`imagenet classify --weights=<data root>/training/latest.caffemodel IMAGE`: the bundle
    the pipeline wrote supplies the deploy net, mean, crop and scale; the listing's labels
    score it as the evaluate stage's centre crops do."""
    from flows.cli import main

    code = main(["classify", f"--weights={data_root / 'training' / 'latest.caffemodel'}",
                 "--center_only", f"--root_folder={data_root / 'val'}/",
                 str(data_root / "val.txt")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "classified 9 of 9 images" in err and "settings from snap.inference.json" in err


def test_classify_flow_gives_a_top_k_table(first_run, data_root):
    """The imagenet/classify deployment's flow: the newest model under the data root by
    default, a listing in, the `imagenet-classify` table out."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.classify import classify
    from tasks.classify import ARTIFACT_KEY

    state = classify(images=[str(data_root / "val.txt")], data_root=str(data_root),
                     root_folder=f"{data_root / 'val'}/", center_only=True, top_k=2,
                     return_state=True)
    record = state.result()
    assert record["classified"] == 9 and record["labelled"] == 9
    assert 0 <= record["top1"] <= record["top2"] <= 1 and len(record["rows"]) == 9
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    table = next(a for a in artifacts if a.key == ARTIFACT_KEY)
    assert "classified 9 of 9 images" in table.description
    missing = classify(images=["nope.jpg"], data_root=str(data_root), return_state=True)
    assert missing.is_failed() and "no such file or folder" not in missing.message
    assert missing.message.startswith("classify: no images to classify")


def test_mean_comes_from_convert_sums_and_is_reread_for_a_foreign_lmdb(first_run, data_root,
                                                                        make_params, tmp_path):
    """The mean stage did not read the train LMDB (convert kept the sums), yet wrote the file
    compute_image_mean writes; without sums that match the LMDB, it reads the LMDB."""
    from data import pixelsum
    from data.mean import compute_image_mean
    from flows.imagenet import imagenet

    assert first_run["records"]["mean"]["source"] == convert_tasks.MEAN_FROM_SUMS
    train_db = convert_tasks.lmdb_path(data_root, "train")
    mean_file = convert_tasks.mean_path(data_root)
    compute_image_mean(train_db, tmp_path / "read.binaryproto")
    assert mean_file.read_bytes() == (tmp_path / "read.binaryproto").read_bytes()

    sums = pixelsum.sum_path(train_db)
    kept = sums.read_bytes()
    saved = pixelsum.load(sums)
    pixelsum.save(sums, saved.total, saved.count, "digest of some other LMDB")
    try:
        forced = imagenet(**make_params(data_root, stages=["mean"],
                                        force=["mean"]).flow_parameters())
        assert forced["records"]["mean"]["source"] == convert_tasks.MEAN_FROM_LMDB
        assert mean_file.read_bytes() == (tmp_path / "read.binaryproto").read_bytes()
    finally:
        sums.write_bytes(kept)


def test_changing_resize_reruns_convert_and_downstream_only(first_run, data_root, make_params):
    from flows.imagenet import imagenet

    changed = imagenet(**make_params(data_root, resize_height=14,
                                     resize_width=14).flow_parameters())
    assert ran(changed) == {"convert-train", "convert-val", "mean", "train-0-2", "train-2-4",
                            "train-4-6", "evaluate"}
    # Back to the base size: the LMDBs and mean on disk are the 14x14 ones, so they are rebuilt
    # (same digests as the first run's), and the first run's training segments are reused.
    back = imagenet(**make_params(data_root).flow_parameters())
    assert ran(back) == {"convert-train", "convert-val", "mean", "evaluate"}
    assert back["top1"] == first_run["top1"]


def test_one_stage_rerun_keeps_the_data_root_consistent(first_run, data_root, make_params,
                                                        tmp_path):
    """convert-lmdb's preset with only the data root rebuilds at the size the root was built
    with; at another size the mean follows the train LMDB; a training run after it meets a mean
    of its LMDB's size even when one of another size was left on disk."""
    from data.datum import read_blobproto
    from flows.imagenet import imagenet

    train_db, mean = convert_tasks.lmdb_path(data_root, "train"), convert_tasks.mean_path(data_root)
    again = imagenet(**make_params(data_root, stages=["convert"], force=["convert"],
                                   resize_height=None, resize_width=None).flow_parameters())
    assert statuses(again) == {"convert-train": "ran", "convert-val": "ran"}
    assert convert_tasks.recorded_conversion(train_db)["resize_height"] == 16
    kept = {p: p.read_bytes() for p in (mean, mean.with_name(mean.name + ".manifest.json"))}
    try:
        other = imagenet(**make_params(data_root, stages=["convert"], force=["convert"],
                                       resize_height=14, resize_width=14).flow_parameters())
        assert ran(other) == {"convert-train", "convert-val", "mean"}
        assert read_blobproto(mean).shape[-2:] == (14, 14)
        for path, payload in kept.items():  # a mean of the old size left beside the new LMDB
            path.write_bytes(payload)
        trained = imagenet(**make_params(data_root, stages=["train", "evaluate"],
                                         resize_height=None, resize_width=None
                                         ).flow_parameters())
        # (the 14x14 training may come from the cache: an earlier test trained at that size)
        assert "mean" in ran(trained) and trained["top1"] is not None
        assert {"train-0-2", "train-2-4", "train-4-6", "evaluate"} <= set(statuses(trained))
        assert read_blobproto(mean).shape[-2:] == (14, 14)
    finally:
        back = imagenet(**make_params(data_root).flow_parameters())
    assert back["top1"] == first_run["top1"]


def test_deleting_val_lmdb_reruns_its_conversion_and_evaluate(first_run, data_root, make_params):
    from flows.imagenet import imagenet

    val = convert_tasks.lmdb_path(data_root, "val")
    digest = read_manifest(val)["digest"]
    shutil.rmtree(val)
    again = imagenet(**make_params(data_root).flow_parameters())
    assert ran(again) == {"convert-val", "evaluate"}
    assert read_manifest(val)["digest"] == digest


def test_convert_lmdb_preset_then_full_run_recomputes_nothing(first_run, data_root, make_params):
    from flows.imagenet import imagenet

    digests = {s: read_manifest(convert_tasks.lmdb_path(data_root, s))["digest"] for s in ("train", "val")}
    rebuilt = imagenet(**make_params(data_root, stages=["convert"],
                                     force=["convert"]).flow_parameters())
    assert statuses(rebuilt) == {"convert-train": "ran", "convert-val": "ran"}
    assert {s: read_manifest(convert_tasks.lmdb_path(data_root, s))["digest"]
            for s in ("train", "val")} == digests
    full = imagenet(**make_params(data_root).flow_parameters())
    assert ran(full) == set()


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


# Each stage's upstream task runs, as the flow run's graph draws them (cached runs included).
EDGES = {
    "extract-train": {"download-train"}, "extract-val": {"download-val"},
    "listings": {"download-aux", "extract-train", "extract-val"},
    "convert-train": {"listings", "extract-train"}, "convert-val": {"listings", "extract-val"},
    "mean": {"convert-train"}, "train-0-2": {"convert-train", "convert-val", "mean"},
    "train-2-4": {"train-0-2"}, "train-4-6": {"train-2-4"}, "evaluate": {"train-4-6"},
}


def test_task_runs_record_their_upstream_stages(first_run, data_root, make_params):
    from flows.imagenet import imagenet

    state = imagenet(**make_params(data_root).flow_parameters(), return_state=True)
    # Task runs reach the server as events, processed a little later: wait for all of them.
    deadline = time.monotonic() + API_CATCH_UP_S
    while True:
        runs = _task_runs(state.state_details.flow_run_id)
        if {tr.name for tr in runs} >= ALL_STAGES or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    names = {tr.id: tr.name for tr in runs}
    upstream = {tr.name: {names[i.id] for i in tr.task_inputs.get("wait_for", [])} for tr in runs}
    assert {name: upstream[name] for name in EDGES} == EDGES
    # every stage came from the cache, and its task run says why (not "Cache Key: None")
    for tr in runs:
        assert tr.state.name == "Cached", (tr.name, tr.state)
        assert tr.state.message.startswith("cached: inputs, parameters and code are those ")
        assert tr.state.state_details.cache_key and tr.state.state_details.cache_key in \
            tr.state.message
    assert all(not upstream[f"download-{kind}"] for kind in ("train", "val", "aux"))


def test_injected_segment_failure_retries_from_newest_snapshot(data_root, make_params, monkeypatch):
    from flows.imagenet import imagenet
    from tasks.train import INJECT_FAILURE_ENV

    monkeypatch.setenv(INJECT_FAILURE_ENV, "5")
    # max_iter 8 is a new training configuration: all four segments train.
    state = imagenet(**make_params(data_root, max_iter=8).flow_parameters(), return_state=True)
    result = state.result()
    assert ran(result) == {"train-0-2", "train-2-4", "train-4-6", "train-6-8", "evaluate"}
    runs = {tr.name: tr for tr in _task_runs(state.state_details.flow_run_id)}
    assert runs["train-4-6"].run_count == 2  # failed once, retried once
    assert all(runs[n].run_count == 1 for n in ("train-0-2", "train-2-4", "train-6-8"))
    by_stage = {row["stage"]: row for row in result["stages"]}
    assert by_stage["train-4-6"]["status"] == "ran"
    # The retry resumed from iteration 4's snapshot: iterations 0-4 were not recomputed.
    run_dir = Path(result["outputs"]["final weights"]).parent
    assert (run_dir / "injected-failure-5.done").read_text().strip() == "5"
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[runs["train-4-6"].id])))
    messages = [log.message for log in logs]
    resumes = [m for m in messages if "Resuming from" in m]
    assert len(resumes) == 2 and all("_iter_4.solverstate" in m for m in resumes), resumes


CHILD = textwrap.dedent("""
    import json, sys
    from flows import prefect_env
    prefect_env.configure()
    from flows.imagenet import PipelineParams, imagenet
    result = imagenet(**PipelineParams.model_validate_json(sys.argv[1]).flow_parameters())
    print(json.dumps({"stages": result["stages"]}))
""")


def test_sigkilled_flow_resumes_and_matches_uninterrupted_weights(first_run, make_params, tmp_path):
    """The base configuration again in a fresh data root: killed once a snapshot exists, then
    rerun; its final weights equal those of the uninterrupted first run, byte for byte."""
    from prefect.settings import PREFECT_API_URL

    from flows.imagenet import imagenet

    root = tmp_path / "killed"
    params = make_params(root)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, params.model_dump_json()], cwd=REPO,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KILL_WAIT_S
    killed_after = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            snaps = sorted(root.glob("training/*/snap_iter_2.solverstate"))
            if snaps:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_after = snaps[0]
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_after is not None, "the child finished or never snapshotted before the kill"
    assert not (killed_after.parent / "snap_iter_6.caffemodel").exists()

    resumed = imagenet(**params.flow_parameters())
    status = statuses(resumed)
    assert status["train-4-6"] == "ran"
    records = resumed["records"]
    # Nothing before the snapshot the kill left is trained again.
    if status["train-0-2"] == "ran":
        assert records["train-0-2"]["resumed_from"] == 2
    assert records["train-2-4"]["resumed_from"] == 2
    final = Path(resumed["outputs"]["final weights"])
    assert _learned_blobs(final) == _learned_blobs(Path(first_run["outputs"]["final weights"]))


def _learned_blobs(caffemodel: Path) -> list[tuple[str, list[bytes]]]:
    """The weights, bit for bit (a caffemodel also holds the layer parameters, whose Data layer
    sources name the data root, so the files themselves differ between data roots)."""
    from data.proto import caffe_pb2

    net = caffe_pb2.NetParameter.FromString(caffemodel.read_bytes())
    blobs = [(layer.name, [blob.SerializeToString() for blob in layer.blobs]) for layer in net.layer]
    assert sum(len(b) for _, b in blobs) >= 4  # conv and fc weights and biases
    return blobs


def test_a_stage_without_its_inputs_fails_in_one_line_and_creates_nothing(make_params, tmp_path):
    from flows.imagenet import imagenet

    root = tmp_path / "never-built"
    state = imagenet(**make_params(root, stages=["convert"], force=["convert"]).flow_parameters(),
                     return_state=True)
    assert state.is_failed()
    assert state.message.startswith("stage convert-train: ") and "\n" not in state.message
    assert "does not exist" in state.message and str(root / "train") in state.message
    assert not root.exists()
    # a download that fails (nothing listens on the port: refused, not retried) leaves no
    # folder either (no downloads/, no .prefect-results/), and the summary says what happened
    refused = "http://127.0.0.1:9/"
    state = imagenet(**{**make_params(root).flow_parameters(), "stages": ["download"],
                        "sources": {"train": refused + "ILSVRC2012_img_train.tar",
                                    "val": refused + "ILSVRC2012_img_val.tar",
                                    "aux": refused + "caffe_ilsvrc12.tar.gz"}},
                     return_state=True)
    assert state.is_failed() and state.message.startswith("stage download-")
    assert not root.exists(), sorted(p.name for p in root.rglob("*"))
    summary = _summary_of(state)
    assert "# imagenet pipeline summary: Failed" in summary and "download-" in summary
    assert "## What a rerun does" in summary


def _summary_of(state) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.report import ARTIFACT_KEY_SUMMARY

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return next(a.data for a in artifacts if a.key == ARTIFACT_KEY_SUMMARY)


def test_bad_parameters_fail_in_one_line(make_params, tmp_path):
    from flows.imagenet import imagenet

    params = make_params(tmp_path / "root").flow_parameters()
    state = imagenet(**{**params, "resize_height": -1}, return_state=True)
    assert state.is_failed() and state.message.startswith("parameters: resize_height: ")
    state = imagenet(**{**params, "solver": str(tmp_path / "nope.prototxt"),
                        "stages": ["train"]}, return_state=True)
    assert state.is_failed() and state.message.startswith("stage train: ")
    assert not (tmp_path / "root").exists()


def test_two_training_processes_run_the_train_stage(first_run, data_root, make_params):
    """processes=2: each train segment runs two local processes joined by jax.distributed (one
    CPU device each: the global batch doubles, so a configuration folder of its own); process
    0's test outputs and throughput reach the flow as from one process."""
    from flows.imagenet import imagenet

    result = imagenet(**make_params(data_root, processes=2, snapshot_interval=6)
                      .flow_parameters())
    assert ran(result) == {"train-0-6", "evaluate"}
    record = result["records"]["train-0-6"]
    assert [row["iter"] for row in record["tests"]] == [0, 2, 4, 6]
    assert record["images_per_second"] > 0 and result["top1"] is not None
    final = Path(result["outputs"]["final weights"])
    assert final.parent != Path(first_run["outputs"]["final weights"]).parent
    side = json.loads(final.with_name("snap_iter_6.resume.json").read_text())
    assert side["processes"] == 2 and side["devices"] == 2
