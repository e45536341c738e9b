"""`imagenet time`: caffe time's report on a tiny net (random data when the LMDB is absent)."""
from __future__ import annotations

import re

import pytest

from flows.cli import main

TINY = """
name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label"
        transform_param { crop_size: 9 } data_param { source: "absent_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_time_reports_caffe_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.prototxt").write_text(TINY)
    assert main(["time", "-model", "tiny.prototxt", "--iterations=2", "--batch_size=3"]) == 0
    out = capsys.readouterr().out
    assert "source 'absent_lmdb' not found" in out and "(3, 3, 9, 9)" in out
    assert re.search(r"Compile time: forward \d+ ms, backward .*\d+ ms, forward-backward \d+ ms", out)
    assert out.count("forward-backward time:") == 2
    for what in ("Forward pass", "Backward pass", "Forward-Backward"):
        assert re.search(rf"Average {what}: [\d.]+ ms\.", out), what
    assert re.search(r"Images/s \(forward-backward\): [\d.]+", out)


def test_time_rejects_bad_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.prototxt").write_text(TINY)
    assert main(["time", "--model=tiny.prototxt", "--phase=VALIDATE"]) == 1
    assert "VALIDATE" in capsys.readouterr().err
    # A bad flag value is a usage error (exit 2), refused by the parser before any work.
    with pytest.raises(SystemExit) as exit_info:
        main(["time", "--iterations=0", "--model=tiny.prototxt"])
    assert exit_info.value.code == 2
    assert "--iterations/-iterations: must be >= 1, got 0" in capsys.readouterr().err
