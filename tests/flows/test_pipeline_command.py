"""`imagenet pipeline`: every flow parameter is a flag (Caffe's spellings too), lists are
comma-separated, and bad values fail before any run."""
from __future__ import annotations

import argparse
import json
import os

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


def test_prefect_state_goes_to_the_data_root_not_the_checkout(tmp_path, monkeypatch):
    """PREFECT_HOME is chosen from --data_root (or --params' data_root, or the default data
    root) before Prefect is imported; a PREFECT_HOME in the environment wins."""
    from flows import prefect_env
    from flows.imagenet import PipelineParams

    assert PipelineParams().data_root == pipeline.DEFAULT_DATA_ROOT
    for name in ("PREFECT_HOME", "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    home = pipeline.prepare(["--data_root", str(tmp_path / "root"), "--stages=convert"])
    assert home == tmp_path / "root" / ".prefect"
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(home / "jax-cache")
    assert prefect_env.PROJECT_ROOT not in home.parents

    params = tmp_path / "p.json"
    params.write_text(json.dumps({"data_root": str(tmp_path / "json-root")}))
    monkeypatch.delenv("PREFECT_HOME")
    assert pipeline.prepare(["--params", str(params)]) == tmp_path / "json-root" / ".prefect"
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.chdir(tmp_path)
    assert pipeline.prepare([]) == tmp_path / pipeline.DEFAULT_DATA_ROOT / ".prefect"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "mine"))
    assert pipeline.prepare(["--data_root", "/elsewhere"]) == tmp_path / "mine"

    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    assert "DATA_ROOT/.prefect" in parser.format_help()
