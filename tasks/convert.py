"""Conversion stages as Prefect tasks: the train and val LMDBs (Caffe's convert_imageset, as
examples/imagenet/create_imagenet.sh runs it) and the mean file (compute_image_mean).

Each records in its manifest the content digest of what it wrote (lmdb_content_digest for an
LMDB, sha256 for the mean file): downstream stages key on that digest, so a rebuilt LMDB with
the same records leaves the mean and the training cached.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from tasks.cache import file_digest, manifest_matches, read_manifest, write_manifest
from tasks.stage import ProgressArtifact, RecordedKey, StageResult, fail_in_one_line

LMDB_DIR = "lmdb"
# Caffe's names (examples/imagenet/create_imagenet.sh, make_imagenet_mean.sh).
LMDB_NAMES = {"train": "ilsvrc12_train_lmdb", "val": "ilsvrc12_val_lmdb"}
MEAN_FILE = "imagenet_mean.binaryproto"
CONVERT_CODE = ("data.convert", "data.datum", "data.lmdb_io", "data.images", "data.pixelsum")
MEAN_CODE = ("data.mean", "data.datum", "data.lmdb_io", "data.pixelsum")
# How the mean stage got the mean (its record's "source").
MEAN_FROM_SUMS = "pixel sums kept by convert (the LMDB was not read)"
MEAN_FROM_LMDB = "read from the LMDB"
SKIPPED_EXAMPLES = 5
# What the conversion was asked for; recorded in the LMDB's manifest, so that a rerun of the
# convert stage alone reuses the size the data root was built with (recorded_conversion).
CONVERSION_PARAMS = ("resize_height", "resize_width", "encoded", "shuffle_seed", "resize_mode")
# Threads, not processes: a forkserver pool started from inside a flow run (`python -m
# flows.demo`) hung here with its workers idle; OpenCV's decode and resize release the GIL, so
# threads keep the cores busy, and the records are the same for any pool (data.convert).
CONVERT_POOL = "thread"


def lmdb_path(data_root: Path | str, split: str) -> Path:
    return Path(data_root) / LMDB_DIR / LMDB_NAMES[split]


def mean_path(data_root: Path | str) -> Path:
    return Path(data_root) / LMDB_DIR / MEAN_FILE


@task(cache_policy=RecordedKey())
@fail_in_one_line
def convert_lmdb(
    cache_key: str,
    split: str,
    data_root: str,
    image_root: str,
    listfile: str,
    resize_height: int,
    resize_width: int,
    shuffle_seed: int | None,
    encoded: bool,
    gray: bool = False,
    workers: int = 0,
    resize_mode: str = "squash",
) -> StageResult:
    """convert_imageset IMAGE_ROOT/ LISTFILE lmdb/ilsvrc12_<split>_lmdb, replacing what is there
    (`resize_mode`: data.images.RESIZE_MODES; squash is Caffe's)."""
    from data import pixelsum
    from data.convert import convert_imageset
    from data.lmdb_io import lmdb_content_digest

    log = get_run_logger()
    db = lmdb_path(data_root, split)
    db.parent.mkdir(parents=True, exist_ok=True)
    progress = ProgressArtifact(f"convert {split} LMDB (images)")
    result = convert_imageset(
        str(image_root).rstrip("/") + "/", listfile, db,
        resize_height=resize_height, resize_width=resize_width, resize_mode=resize_mode,
        shuffle=shuffle_seed is not None, seed=shuffle_seed or 0, gray=gray,
        encoded=encoded, workers=workers or None, overwrite=True, progress=progress,
        pool=CONVERT_POOL, pixel_sum=split == "train",
    )
    progress.finish()
    digest = result.digest or lmdb_content_digest(db)
    # The train LMDB's pixel sums make the mean stage free (compute_mean); written before the
    # manifest, and tied to this digest, so they are used only with these records.
    sums = pixelsum.sum_path(db)
    if result.pixel_sum is not None:
        pixelsum.save(sums, result.pixel_sum, result.count, digest)
    else:
        sums.unlink(missing_ok=True)
    # Skipped images are counted and named (the first few), never dropped silently.
    record = {"count": int(result.count), "skipped": len(result.skipped),
              "truncated": len(result.truncated), "total_lines": int(result.total_lines),
              "digest": digest,
              "params": {"resize_height": resize_height, "resize_width": resize_width,
                         "encoded": encoded, "shuffle_seed": shuffle_seed,
                         "resize_mode": resize_mode},
              "skipped_examples": [f"line {n}: {path}: {why}"
                                   for n, path, why in result.skipped[:SKIPPED_EXAMPLES]]}
    write_manifest(db, stage=f"convert_{split}", key=cache_key, digest=digest, record=record,
                   content=f"lmdb:{digest}")
    seconds = float(result.seconds)
    rate = result.count / seconds if seconds > 0 else 0.0
    log.info("%s: %d images, %d skipped, %d truncated, %.1f s (%.0f img/s)", db, result.count,
             len(result.skipped), len(result.truncated), seconds, rate)
    for line in record["skipped_examples"]:
        log.warning("skipped %s", line)
    return StageResult(stage=f"convert_{split}", key=cache_key, outputs={"lmdb": str(db)},
                       record=record, seconds=seconds, throughput=f"{rate:.0f} img/s")


def recorded_conversion(db: Path | str) -> dict[str, Any]:
    """The conversion parameters an LMDB of this pipeline was built with: its manifest's record,
    else (a manifest older than that record) the size of its first record, when raw; {} when
    there is no LMDB with a manifest."""
    manifest = read_manifest(db)
    if manifest is None:
        return {}
    params = manifest.get("record", {}).get("params")
    if isinstance(params, dict):
        return {k: params[k] for k in CONVERSION_PARAMS if k in params}
    from data.datum import parse_datum_header
    from data.lmdb_io import LmdbReader

    try:
        with LmdbReader(db) as reader:
            first = reader.first()
    except Exception:  # an unreadable LMDB is the convert stage's to report, not this guess's
        return {}
    if first is None:
        return {}
    head = parse_datum_header(first[1])
    if head.encoded:
        return {"encoded": True}
    return {"resize_height": int(head.height), "resize_width": int(head.width), "encoded": False}


@task(cache_policy=RecordedKey())
@fail_in_one_line
def compute_mean(cache_key: str, data_root: str, train_lmdb: str) -> StageResult:
    """compute_image_mean lmdb/ilsvrc12_train_lmdb lmdb/imagenet_mean.binaryproto: from the
    pixel sums the train conversion kept when they belong to the LMDB's current records (its
    manifest's digest, the LMDB unchanged since), else by reading the LMDB. Same file either
    way (data/pixelsum.py)."""
    from data import pixelsum
    from data.mean import compute_image_mean, mean_from_sum

    log = get_run_logger()
    out = mean_path(data_root)
    saved = pixelsum.load(pixelsum.sum_path(train_lmdb))
    manifest = read_manifest(train_lmdb)
    if (saved is not None and manifest is not None and manifest_matches(train_lmdb)
            and manifest.get("digest") == saved.digest):
        result, source = mean_from_sum(saved, out), MEAN_FROM_SUMS
    else:
        progress = ProgressArtifact("mean over the train LMDB (images)")
        result, source = compute_image_mean(train_lmdb, out, progress=progress), MEAN_FROM_LMDB
        progress.finish()
    seconds = float(result.seconds)
    channel_means = [float(c) for c in result.channel_means]
    record = {"count": int(result.count), "channel_means": channel_means, "source": source}
    digest = file_digest(out)
    write_manifest(out, stage="mean", key=cache_key, digest=digest, record=record,
                   content=f"sha256:{digest}")
    rate = result.count / seconds if seconds > 0 else 0.0
    throughput = "from convert's sums" if source == MEAN_FROM_SUMS else f"{rate:.0f} img/s"
    log.info("mean of %d images written to %s (%s); channel means (BGR) %s", result.count, out,
             source, ", ".join(f"{c:.3f}" for c in channel_means))
    return StageResult(stage="mean", key=cache_key, outputs={"mean": str(out)}, record=record,
                       seconds=seconds, throughput=throughput)
