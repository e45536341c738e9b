"""data/labels.py: the label ranges of the layers reading labels, and the per-batch check."""
from __future__ import annotations

import pytest

from data.errors import ImagenetError
from data.labels import LabelCheck, check_labels


def test_accepts_class_indices_and_only_the_ignore_label_outside() -> None:
    plain = LabelCheck("loss", "SoftmaxWithLoss", classes=4)
    assert [plain.accepts(v) for v in (-1, 0, 3, 4)] == [False, True, True, False]
    ignoring = LabelCheck("loss", "SoftmaxWithLoss", classes=4, ignore_label=-1)
    assert [ignoring.accepts(v) for v in (-2, -1, 0, 3, 4)] == [False, True, True, True, False]
    assert LabelCheck("acc", "Accuracy", classes=4, ignore_label=255).accepts(255)


def test_first_bad_label_is_named_with_its_record_and_layer() -> None:
    checks = [LabelCheck("loss", "SoftmaxWithLoss", 4, ignore_label=-1),
              LabelCheck("accuracy", "Accuracy", 4)]
    check_labels([0, 1, 2, 3], checks, lambda j: f"record {j}")  # all fine
    with pytest.raises(ImagenetError) as info:
        check_labels([0, -1, 2], checks, lambda j: f"db: record 'k{j}'")
    # -1 is the loss's ignore_label, but Accuracy (no ignore_label) would index with it
    assert str(info.value).startswith(
        "db: record 'k1' has label -1, but layer 'accuracy' (Accuracy) reads class indices "
        "in [0, 4); fix the label")
    with pytest.raises(ImagenetError, match=r"'k2' has label 9, .*'loss' .* or its ignore_label "
                                            r"-1"):
        check_labels([0, 3, 9], checks, lambda j: f"db: record 'k{j}'")


def test_net_gathers_the_checks_of_the_layers_reading_a_label_top() -> None:
    from model.net import Net
    from model.prototxt import parse_net_text

    net_text = """
    layer { name: "in" type: "Input" top: "data" top: "label"
            input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
    layer { name: "split" type: "Split" bottom: "label" top: "l1" top: "l2" }
    layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
            inner_product_param { num_output: 5 } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "l1" top: "loss"
            loss_param { ignore_label: -1 } }
    layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "l2" top: "acc" }
    """
    net = Net(parse_net_text(net_text), "TEST")
    assert net.label_checks("label") == [LabelCheck("loss", "SoftmaxWithLoss", 5, -1),
                                         LabelCheck("acc", "Accuracy", 5, None)]
    assert net.label_checks("data") == []
