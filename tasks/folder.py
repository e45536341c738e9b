"""The listings stage for a folder of your own images (data/image_folder.py) as a Prefect task:
train.txt, val.txt and labels.txt in the data root, each with its manifest.

The flow keys the stage on the folder's fingerprint (path, size and mtime of every file below
it), so adding, removing or replacing an image reruns it; the listings' manifests record
`image_folder.listing_digest` (the listing's bytes plus the size and mtime of each file it
names), so each convert stage reruns only when its own split changed.
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from data.image_folder import LABELS_FILE, LISTING_FILES, TRAIN_LIST, VAL_LIST
from tasks.cache import file_digest, write_manifest
from tasks.stage import RecordedKey, StageResult, fail_in_one_line

# Library modules whose source is part of the stage's cache key.
FOLDER_LISTINGS_CODE = ("data.image_folder", "data.ilsvrc12")


def listing_paths(data_root: Path | str) -> dict[str, Path]:
    """{"train.txt" | "val.txt" | "labels.txt": path} in the data root."""
    return {name: Path(data_root) / name for name in LISTING_FILES}


@task(cache_policy=RecordedKey())
@fail_in_one_line
def write_folder_listings(cache_key: str, data_root: str, images: str,
                          val_percent: float | None, seed: int) -> StageResult:
    """Caffe's train.txt / val.txt and labels.txt for the class folders under `images`."""
    from data import image_folder as lib

    log = get_run_logger()
    start = time.monotonic()
    result = lib.write_folder_listings(Path(data_root), Path(images), val_percent=val_percent,
                                       seed=seed)
    for note in result.notes:
        log.warning("%s: %s", images, note)
    for name in (TRAIN_LIST, VAL_LIST):
        split = "train" if name == TRAIN_LIST else "val"
        path = result.paths[name]
        write_manifest(path, stage="listings", key=cache_key,
                       digest=lib.listing_digest(path, result.roots[split]),
                       record={"image_root": str(result.roots[split])})
    labels = result.paths[LABELS_FILE]
    write_manifest(labels, stage="listings", key=cache_key, digest=file_digest(labels),
                   record={"classes": len(result.classes)})
    record = {"source": f"class folders of {images}", **result.counts,
              "roots": {k: str(v) for k, v in result.roots.items()}, "notes": list(result.notes)}
    log.info("%d classes (%s): %d train + %d val images listed", len(result.classes),
             ", ".join(result.classes[:10]) + (", ..." if len(result.classes) > 10 else ""),
             len(result.train), len(result.val))
    return StageResult(stage="listings", key=cache_key,
                       outputs={name: str(p) for name, p in result.paths.items()},
                       record=record, seconds=time.monotonic() - start)
