"""`imagenet pipeline`: every flow parameter is a flag (Caffe's spellings too), lists are
comma-separated, and bad values fail before any run."""
from __future__ import annotations

import argparse
import json

import pytest

from flows.commands import pipeline
from flows.flags import caffe_style_argv


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    return parser.parse_args(caffe_style_argv(argv))


def test_flags_build_the_flow_parameters(tmp_path):
    base = tmp_path / "params.json"
    base.write_text(json.dumps({"data_root": "/from/json", "sources": {"aux": "/aux.tgz"}}))
    p = pipeline.build_params(_parse([
        "--params", str(base), "-resize_height=64", "--resize-width", "64", "--stages=convert,mean",
        "--force", "convert", "--train", "http://m/ILSVRC2012_img_train.tar", "--shuffle_seed=none",
        "--encoded=true", "--max_iter", "300", "--devices", "0,1"]))
    assert p.data_root == "/from/json"
    assert (p.resize_height, p.resize_width, p.encoded, p.shuffle_seed) == (64, 64, True, None)
    assert p.stages == ["convert", "mean"] and p.force == ["convert"]
    assert p.sources.train == "http://m/ILSVRC2012_img_train.tar" and p.sources.aux == "/aux.tgz"
    assert p.max_iter == 300 and p.devices == [0, 1]


def test_bad_values_fail_before_a_run():
    with pytest.raises(Exception, match="stages"):
        pipeline.build_params(_parse(["--stages=convert,nonsense"]))
    with pytest.raises(Exception, match="resize_height"):
        pipeline.build_params(_parse(["--resize_height=-3"]))
