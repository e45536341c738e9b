"""tasks/ helpers with no Prefect run: which download failures are retried, how a solver is
rewritten for a data root and cut into segments, which snapshot a segment resumes from, and the
report's table and curve."""
from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from data.errors import ImagenetError
from data.proto import caffe_pb2
from tasks import acquire, report, train
from tasks.cache import write_manifest

NET = """
name: "T"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mean_file: "old_mean" } data_param { source: "old_train" batch_size: 4 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { mean_file: "old_mean" } data_param { source: "old_val" batch_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: %d } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""
SOLVER = 'net: "net.prototxt"\nmax_iter: 10\nsnapshot: 4\nsnapshot_prefix: "x"\nbase_lr: 0.1\n'


def test_downloads_have_one_retry_policy():
    """data.download's policy is the only one: the Prefect task adds no retries of its own (the
    two used to multiply: 6 tries inside 4 task runs)."""
    assert acquire.download_archive.retries == 0
    assert acquire.download_archive.retry_condition_fn is None


def test_download_identity_ignores_credentials():
    a = acquire.download_identity("http://alice:pw1@h/unknown.tar?sig=abc", None)
    b = acquire.download_identity("http://bob:pw2@h/unknown.tar?sig=xyz", None)
    assert a == b == {"source": "http://h/unknown.tar"}


def test_download_identity_is_the_checksum_not_the_mirror():
    a = acquire.download_identity("http://127.0.0.1:1/ILSVRC2012_img_val.tar", None)
    b = acquire.download_identity("http://127.0.0.1:2/ILSVRC2012_img_val.tar", None)
    assert a == b == {"name": "ILSVRC2012_img_val.tar", "md5": "29b22e2961454d5413ddabcf34fc5622"}
    assert acquire.download_identity("http://h/unknown.tar", None) == {"source": "http://h/unknown.tar"}
    assert acquire.archive_path("/d", "/mnt/x/ILSVRC2012_img_train.tar") == \
        Path("/d/downloads/ILSVRC2012_img_train.tar")


def _data(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("train_lmdb", "val_lmdb", "mean"):
        p = tmp_path / name
        p.write_bytes(name.encode())
        write_manifest(p, stage="test", key="k", digest=name)
        out[name] = p
    return out


def _prepare(tmp_path: Path, classes: int, **kw) -> train.TrainingPlan:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "net.prototxt").write_text(NET % classes)
    (src / "solver.prototxt").write_text(SOLVER)
    d = _data(tmp_path)
    return train.prepare_training(tmp_path / "root", str(src / "solver.prototxt"),
                                  train_lmdb=d["train_lmdb"], val_lmdb=d["val_lmdb"],
                                  mean_file=d["mean"], **kw)


def test_prepare_training_points_the_net_at_this_data_root(tmp_path):
    plan = _prepare(tmp_path, classes=10)
    assert plan.segment_ends == [4, 8, 10]
    assert plan.test_batch_size == 3
    assert plan.accuracy_top_k == {"accuracy": 1, "accuracy_top5": 5}
    net = text_format.Parse(Path(plan.net).read_text(), caffe_pb2.NetParameter())
    sources = [l.data_param.source for l in net.layer if l.type == "Data"]
    assert sources == [str((tmp_path / "train_lmdb").resolve()), str((tmp_path / "val_lmdb").resolve())]
    assert {l.transform_param.mean_file for l in net.layer if l.type == "Data"} == \
        {str((tmp_path / "mean").resolve())}
    solver = text_format.Parse(Path(plan.solver).read_text(), caffe_pb2.SolverParameter())
    assert solver.snapshot_prefix == plan.snapshot_prefix and solver.net == plan.net
    again = _prepare(tmp_path, classes=10, max_iter=6, snapshot_interval=3)
    assert again.segment_ends == [3, 6] and again.run_dir != plan.run_dir


def test_device_and_process_counts_are_part_of_the_configuration(tmp_path):
    """Both multiply the global batch: a rerun on another count never resumes the other's
    snapshots. One device (no ids, one id, the CPU) keeps the id it always had."""
    one = _prepare(tmp_path, classes=10).config_id
    assert _prepare(tmp_path, classes=10, devices=[0]).config_id == one
    assert _prepare(tmp_path, classes=10, devices=[-1]).config_id == one
    two = _prepare(tmp_path, classes=10, devices=[0, 1]).config_id
    assert two != one and _prepare(tmp_path, classes=10, devices=[2, 3]).config_id == two
    procs = _prepare(tmp_path, classes=10, processes=2).config_id
    assert len({one, two, procs}) == 3


def test_image_data_nets_read_this_roots_listings_and_images(tmp_path):
    """A net with ImageData layers runs as the pipeline's solver: its layers read the root's
    train.txt/val.txt and extracted trees, which become inputs of the configuration."""
    d = _data(tmp_path)
    lists = {}
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        write_manifest(tmp_path / split, stage="test", key="k", digest=split)
        (tmp_path / f"{split}.txt").write_text("a.JPEG 0\n")
        lists[split] = (tmp_path / f"{split}.txt", tmp_path / split)
    src = tmp_path / "src"
    src.mkdir()
    image_net = (NET % 10).replace('type: "Data"', 'type: "ImageData"').replace(
        "data_param { source:", "image_data_param { source:")
    (src / "net.prototxt").write_text(image_net)
    (src / "solver.prototxt").write_text(SOLVER)
    kw = dict(train_lmdb=d["train_lmdb"], val_lmdb=d["val_lmdb"], mean_file=d["mean"])
    plan = train.prepare_training(tmp_path / "root", str(src / "solver.prototxt"),
                                  image_listings=lists, **kw)
    net = text_format.Parse(Path(plan.net).read_text(), caffe_pb2.NetParameter())
    got = [(l.image_data_param.source, l.image_data_param.root_folder, l.transform_param.mean_file)
           for l in net.layer if l.type == "ImageData"]
    assert got == [(str((tmp_path / f"{s}.txt").resolve()), str((tmp_path / s).resolve()) + "/",
                    str((tmp_path / "mean").resolve())) for s in ("train", "val")]
    assert plan.test_batch_size == 3
    assert plan.image_inputs == {s: [str((tmp_path / f"{s}.txt").resolve()),
                                     str((tmp_path / s).resolve())] for s in ("train", "val")}
    (tmp_path / "val.txt").write_text("b.JPEG 1\n")  # another val listing: another config
    assert train.prepare_training(tmp_path / "root", str(src / "solver.prototxt"),
                                  image_listings=lists, **kw).config_id != plan.config_id
    with pytest.raises(ImagenetError, match="ImageData.*no train listing"):
        train.prepare_training(tmp_path / "root", str(src / "solver.prototxt"), **kw)


@pytest.mark.parametrize("model", ["bvlc_googlenet", "resnet_50"])
def test_zoo_nets_run_as_the_pipelines_solver(tmp_path, model):
    d = _data(tmp_path)
    plan = train.prepare_training(tmp_path / "root", f"model/zoo/{model}/solver.prototxt",
                                  train_lmdb=d["train_lmdb"], val_lmdb=d["val_lmdb"],
                                  mean_file=d["mean"], max_iter=4, snapshot_interval=2)
    assert plan.segment_ends == [2, 4] and plan.test_batch_size == 50
    if model == "bvlc_googlenet":  # three heads: the pipeline reports the main one (loss3)
        assert plan.accuracy_top_k["loss3/top-5"] == 5
        assert list(plan.accuracy_top_k)[-2:] == ["loss3/top-1", "loss3/top-5"]
    else:
        assert plan.accuracy_top_k == {"accuracy": 1, "accuracy_top5": 5}


def test_no_top5_twin_for_fewer_than_five_classes(tmp_path):
    assert _prepare(tmp_path, classes=3).accuracy_top_k == {"accuracy": 1}


def test_newest_snapshot_needs_both_files(tmp_path):
    prefix = str(tmp_path / "snap")
    for it in (2, 4, 6):
        for path in train.snapshot_files(prefix, it):
            path.write_bytes(b"x")
    train.snapshot_files(prefix, 6)[0].unlink()  # half-written: no caffemodel
    assert train.newest_snapshot(prefix, 10) == 4
    assert train.newest_snapshot(prefix, 3) == 2
    assert train.newest_snapshot(prefix, 1) is None


def test_user_errors_are_not_retried():
    from prefect.states import Failed

    assert not train.retry_unless_user_error(None, None, Failed(data=ImagenetError("bad prototxt")))
    assert train.retry_unless_user_error(None, None, Failed(data=RuntimeError("node lost")))


def test_report_table_and_curve(tmp_path):
    rows = [{"iter": 0, "accuracy": 0.1}, {"iter": 100, "accuracy": 0.5}, {"iter": 50, "train loss": 2.0}]
    png = report.render_curve(rows, tmp_path / "curve.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.png_data_url(png).startswith("data:image/png;base64,iVBOR")
    assert report.render_curve([], tmp_path / "none.png") is None
    text = report.format_text_table([{"stage": "mean", "status": "cached"}])
    assert text.splitlines()[0].split() == ["stage", "status"]
    assert text.splitlines()[2].split() == ["mean", "cached"]


def test_concurrent_stages_each_report_their_own_wall_time():
    """Downloads run concurrently and are waited for one after the other: each row gets the
    time to its own end, not the group's (a fake task stands in for Prefect's)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tasks.stage import StageResult, submit_stage

    class State:
        name = "Completed"

        def __init__(self, result):
            self._result = result

        def result(self):
            return self._result

        def is_failed(self):
            return False

        def is_crashed(self):
            return False

        def is_cancelled(self):
            return False

    class Future:
        def __init__(self, inner):
            self._inner = inner

        def add_done_callback(self, fn):
            self._inner.add_done_callback(lambda _: fn(self))

        def wait(self):
            self._inner.result()

        @property
        def state(self):
            return State(self._inner.result())

    class FakeTask:
        def __init__(self, pool, delay):
            self.pool, self.delay = pool, delay

        def with_options(self, **options):
            return self

        def submit(self, cache_key, **kwargs):
            def body():
                time.sleep(self.delay)
                return StageResult(stage="download", key=cache_key)

            return Future(self.pool.submit(body))

    with ThreadPoolExecutor(2) as pool:
        slow = submit_stage(FakeTask(pool, 0.6), "slow", results_root="/nonexistent",
                            cache_key="k1", outputs=[])
        fast = submit_stage(FakeTask(pool, 0.05), "fast", results_root="/nonexistent",
                            cache_key="k2", outputs=[])
        runs = [slow(), fast()]
    assert runs[0].wall_seconds >= 0.5 and runs[1].wall_seconds < 0.4


def test_numbers_at_four_significant_digits():
    assert report.sig(0.044999998062849045) == "0.045"
    assert report.sig(0.99500000476837158) == "0.995"
    assert report.sig(1234567.0) == "1.235e+06" and report.sig(7) == "7"
    rows = report.rounded_rows([{"iter": 100, "accuracy": 0.044999998062849045}])
    assert rows == [{"iter": 100, "accuracy": 0.045}]
    line = report.final_line({"top1": 0.9949999, "top5": 1.0}, "/d/snap_iter_300.caffemodel",
                             data_root="/d")
    assert line == ("pipeline finished: top-1 = 0.995, top-5 = 1 on the val LMDB; "
                    "final weights /d/snap_iter_300.caffemodel")


def test_why_a_stage_ran(tmp_path):
    from tasks.stage import WHY_FORCED, stage_options

    out = tmp_path / "out.bin"
    _, why = stage_options(tmp_path, "k", [out], force=False)
    assert why == "no recorded outputs"  # a first run
    _, why = stage_options(tmp_path, "k", [out], force="val LMDB rebuilt in this run")
    assert why == "no recorded outputs"  # missing outputs say more than the automatic reason
    _, why = stage_options(tmp_path, "k", [out], force=True)
    assert why == WHY_FORCED
