"""flows/ tests: an isolated Prefect (PREFECT_HOME, hence result storage and database, in a temp
dir set by tests/conftest.py before prefect is imported), a test harness server for the session,
and a tiny mini-ILSVRC12 mirror served on 127.0.0.1 with a tiny net, so whole pipeline runs take
seconds. PREFECT_NOTES: the harness isolates the database but not the result storage.
"""
from __future__ import annotations

from pathlib import Path

import pytest

TINY_CLASSES = 3
TINY_TRAIN_PER_CLASS = 6
TINY_VAL_PER_CLASS = 3
TINY_RESIZE = 16

# A net small enough to compile in a second or two: conv -> pool -> fc, with a TEST Accuracy.
TINY_NET = """
name: "Tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 12 mean_file: "placeholder_mean.binaryproto" }
  data_param { source: "placeholder_train_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 12 mean_file: "placeholder_mean.binaryproto" }
  data_param { source: "placeholder_val_lmdb" batch_size: 3 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""

TINY_SOLVER = """
net: "train_val.prototxt"
test_iter: 1
test_interval: 2
base_lr: 0.01
lr_policy: "fixed"
momentum: 0.9
weight_decay: 0.0005
display: 1
max_iter: 6
snapshot: 2
snapshot_prefix: "tiny"
solver_mode: CPU
random_seed: 7
"""


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the session (the flows run against it in-process)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Path:
    from data.mini import make_mini_ilsvrc12

    out = tmp_path_factory.mktemp("mirror")
    make_mini_ilsvrc12(out, classes=TINY_CLASSES, train_per_class=TINY_TRAIN_PER_CLASS,
                       val_per_class=TINY_VAL_PER_CLASS, seed=0)
    return out


@pytest.fixture(scope="session")
def mirror_url(tiny_mirror):
    from flows.demo import MirrorServer

    with MirrorServer(tiny_mirror) as server:
        yield server.url


@pytest.fixture(scope="session")
def tiny_solver(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_net")
    (folder / "train_val.prototxt").write_text(TINY_NET)
    (folder / "solver.prototxt").write_text(TINY_SOLVER)
    return folder / "solver.prototxt"


@pytest.fixture(scope="session")
def make_params(mirror_url, tiny_solver):
    """PipelineParams for the tiny mirror and net; keyword arguments override."""
    from flows.imagenet import PipelineParams, Sources

    def make(data_root: Path, **overrides):
        base = dict(
            sources=Sources(train=f"{mirror_url}/ILSVRC2012_img_train.tar",
                            val=f"{mirror_url}/ILSVRC2012_img_val.tar",
                            aux=f"{mirror_url}/caffe_ilsvrc12.tar.gz",
                            checksums=f"{mirror_url}/MD5SUMS"),
            data_root=str(data_root), resize_height=TINY_RESIZE, resize_width=TINY_RESIZE,
            solver=str(tiny_solver), workers=1,
        )
        base.update(overrides)
        return PipelineParams(**base)

    return make
