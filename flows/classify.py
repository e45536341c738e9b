"""The `imagenet/classify` deployment's flow: classify images with trained weights from the
Prefect UI (or `prefect deployment run imagenet/classify --param images='["photo.jpg"]'`).

Images, folders or `.txt` listings in (paths relative to the project folder the worker runs
in, as the pipeline's data_root); a top-k table artifact out (`imagenet-classify`), with
top-1/top-k accuracy when a listing gives labels. The weights default to the newest model the
pipeline trained under `data_root` (`<data root>/training/latest.caffemodel`); their inference
bundle (model/bundle.py) supplies the deploy net, mean, scale and class names, exactly as for
`imagenet classify --weights=...`. The flow is registered under the pipeline's flow name,
`imagenet`, so its deployment reads `imagenet/classify` beside `imagenet/mini-pipeline`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger
from prefect.states import Failed, State

from flows.commands.pipeline import DEFAULT_DATA_ROOT
from tasks import logs
from tasks.classify import classify_images
from tasks.report import FAILED_EVENT, announce
from tasks.train import LATEST_WEIGHTS, TRAINING_DIR

DEFAULT_TOP_K = 5
# --watch prints it as its last line before the final state: what the table says, in one line.
CLASSIFY_EVENT = "imagenet.classify.finished"


logs.install()  # tracebacks at DEBUG, one line at ERROR (tasks/logs.py)

@flow(name="imagenet", log_prints=True, persist_result=False)
def classify(
    images: list[str],
    weights: str | None = None,
    data_root: str = DEFAULT_DATA_ROOT,
    top_k: int = DEFAULT_TOP_K,
    center_only: bool = False,
    root_folder: str = "",
    labels: str | None = None,
) -> dict[str, Any] | State:
    """Classify images with trained weights; the answer is the `imagenet-classify` table.

    Args:
        images: image files, folders of images (recursively) or .txt listings (`<path>
            [label]` per line, relative to root_folder)
        weights: a .caffemodel; default: the newest final weights the pipeline trained under
            data_root (<data root>/training/latest.caffemodel)
        data_root: the pipeline's data root (only used to find the default weights)
        top_k: classes shown per image
        center_only: score the centre crop only, not the ten oversampled crops
        root_folder: prefix of the paths in listings
        labels: class names, line i = class i (default: the weights' inference bundle's)
    """
    log = get_run_logger()
    chosen = weights or str(Path(data_root) / TRAINING_DIR / LATEST_WEIGHTS)
    state = classify_images(weights=chosen, images=images, top_k=top_k, center_only=center_only,
                            root_folder=root_folder, labels=labels, return_state=True)
    if not state.is_completed():
        message = f"classify: {state.message or state.name}"
        log.error("%s", message)
        announce(message, {"message": message}, event=FAILED_EVENT)
        return Failed(message=message)
    record = state.result().record
    line = record.get("summary") or f"classified {record.get('classified')} images"
    announce(line, {k: record.get(k) for k in ("classified", "skipped", "top1", "labelled")},
             event=CLASSIFY_EVENT)
    return record
