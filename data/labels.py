"""The label ranges the layers that read labels accept, and the check of every batch against them.

Caffe's SoftmaxWithLoss and Accuracy read a label as a class index into their scores
(softmax_loss_layer.cpp, accuracy_layer.cpp): they only DCHECK `0 <= label < num_classes`, so a
release build reads out of bounds and trains on nonsense, and our XLA gathers clip the index
silently. A label equal to the layer's `ignore_label` is skipped, whatever its value. The layers
declare their range (model/layers: `Layer.label_checks`); the input pipeline checks each batch
where it is built (data/pipeline.py), so training and testing stop at the first bad record,
naming it, the label and the layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from data.errors import ImagenetError


@dataclass(frozen=True)
class LabelCheck:
    """Labels layer `layer` (of type `layer_type`) accepts: class indices in [0, classes), and
    `ignore_label` when it has one."""

    layer: str
    layer_type: str
    classes: int
    ignore_label: int | None = None

    def accepts(self, label: int) -> bool:
        return 0 <= label < self.classes or label == self.ignore_label

    def describe(self) -> str:
        accepted = f"class indices in [0, {self.classes})"
        if self.ignore_label is not None:
            accepted += f" or its ignore_label {self.ignore_label}"
        return f"layer {self.layer!r} ({self.layer_type}) reads {accepted}"


def check_labels(labels: Sequence[int], checks: Sequence[LabelCheck],
                 describe_item: Callable[[int], str]) -> None:
    """Raise an ImagenetError for the first label some check refuses: where it came from
    (`describe_item(position in the batch)`), the label, the layer and what to fix."""
    for check in checks:
        for j, label in enumerate(labels):
            if not check.accepts(int(label)):
                raise ImagenetError(
                    f"{describe_item(j)} has label {int(label)}, but {check.describe()}; fix "
                    f"the label (the listing given to convert-imageset) or the layer's class "
                    f"count (num_output of the layer scoring it)")
