"""Classifying images with trained weights as a Prefect task (the `imagenet/classify`
deployment): `imagenet classify`'s work (model/classify.py with the weights' inference bundle,
model/bundle.py) plus a progress artifact and the top-k table artifact.

Never cached: the images are the user's and cheap to score again, and a table artifact is what
the run is for.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from tasks.stage import ProgressArtifact, StageResult, fail_in_one_line

ARTIFACT_KEY = "imagenet-classify"
# A table artifact of a 50,000-image listing would be several MB in the API: the first rows
# only; the count and the accuracy cover all.
MAX_TABLE_ROWS = 1000
SCORE_DIGITS = 4


@task(task_run_name="classify")
@fail_in_one_line
def classify_images(weights: str, images: list[str], *, top_k: int = 5,
                    center_only: bool = False, root_folder: str = "", model: str | None = None,
                    labels: str | None = None, batch_images: int = 4) -> StageResult:
    """Score every image (files, folders, .txt listings) with `weights`; the preprocessing
    comes from its inference bundle unless `model`/`labels` say otherwise."""
    from prefect.artifacts import create_table_artifact

    from data.errors import ImagenetError
    from flows.commands.classify import expand_inputs
    from model.bundle import resolve_settings
    from model.classify import Classifier, read_labels
    from model.classify import top_k as best_of

    log = get_run_logger()
    start = time.monotonic()
    if top_k < 1:
        raise ImagenetError(f"top_k must be >= 1, got {top_k}")
    if not Path(weights).is_file():
        raise ImagenetError(f"weights {weights} do not exist (train first: the pipeline links "
                            "the newest final weights as <data root>/training/latest.caffemodel)")
    paths, listed, bad = expand_inputs(list(images), root_folder)
    for item, reason in bad:
        log.warning("skipped %s: %s", item, reason)
    if not paths:
        raise ImagenetError(f"no images to classify in {images}")
    settings = resolve_settings(weights, model=model, labels=labels)
    names = read_labels(settings.labels) if settings.labels else None
    clf = Classifier(settings.model, weights, image_hw=settings.image_hw,
                     mean_file=settings.mean_file, mean_values=settings.mean_values,
                     raw_scale=settings.raw_scale, input_scale=settings.input_scale,
                     oversample=not center_only, batch_images=min(batch_images, len(paths)),
                     resize_mode=settings.resize_mode)
    if names is not None and len(names) != clf.num_outputs:
        raise ImagenetError(f"{settings.labels} has {len(names)} labels but the net has "
                            f"{clf.num_outputs} outputs")
    progress = ProgressArtifact(f"classify {len(paths)} images", unit="images")
    predictions, skipped = [], []
    for offset in range(0, len(paths), max(batch_images, 1) * 8):
        chunk = paths[offset:offset + max(batch_images, 1) * 8]
        done, missed = clf.predict(chunk)
        predictions += done
        skipped += missed
        progress(offset + len(chunk), len(paths))
    progress.finish()
    k = min(top_k, clf.num_outputs)
    rows: list[dict[str, Any]] = []
    hits1 = hitsk = labelled = 0
    for pred in predictions:
        best = best_of(pred.scores, k)
        label = listed.get(pred.image)
        if label is not None:
            labelled += 1
            hits1 += best[0][0] == label
            hitsk += label in [i for i, _ in best]
        row = {"image": pred.image,
               "class": names[best[0][0]] if names else str(best[0][0]),
               "score": round(best[0][1], SCORE_DIGITS),
               f"top-{k}": "; ".join(f"{names[i] if names else i} ({s:.{SCORE_DIGITS}f})"
                                     for i, s in best)}
        if label is not None:
            row["listed label"] = names[label] if names and 0 <= label < len(names) else label
        rows.append(row)
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    seconds = time.monotonic() - start
    accuracy = ({"top1": hits1 / labelled, f"top{k}": hitsk / labelled, "labelled": labelled}
                if labelled else {})
    summary = (f"classified {len(predictions)} of {len(paths)} images with {Path(weights).name} "
               f"({'centre crop' if center_only else '10 crops'} each"
               + (f", settings from {settings.bundle}" if settings.bundle else "") + ")"
               + (f"; top-1 {hits1}/{labelled}, top-{k} {hitsk}/{labelled} of the listing's "
                  "labels" if labelled else "")
               + (f"; skipped {len(skipped) + len(bad)}" if skipped or bad else ""))
    log.info("%s", summary)
    create_table_artifact(table=rows[:MAX_TABLE_ROWS], key=ARTIFACT_KEY,
                          description=summary + (f" (first {MAX_TABLE_ROWS} rows)"
                                                 if len(rows) > MAX_TABLE_ROWS else ""))
    return StageResult(stage="classify", key="", outputs={"weights": weights},
                       record={"classified": len(predictions), "skipped": len(skipped) + len(bad),
                               "summary": summary,
                               "rows": rows[:MAX_TABLE_ROWS], **accuracy},
                       seconds=seconds, throughput=f"{len(predictions) / seconds:.1f} img/s")

