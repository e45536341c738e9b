"""Acquisition stages as Prefect tasks: build the built-in mini ILSVRC12 when the sources ask for
it, download each archive, extract train and val, write the listings. The work is done by
data.mini, data.download, data.extract and data.listings; this module adds retries on transient
network errors, progress artifacts and the output manifests.

Layout under the data root (data/ilsvrc12.py names it): downloads/<archive>, train/<wnid>/...,
val/..., synsets.txt, synset_words.txt, train.txt, val.txt; mini-ilsvrc12-<size>/ for the mini.
"""
from __future__ import annotations

import errno
import os
import socket
import time
import urllib.error
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefect import task
from prefect.logging import get_run_logger

from data.errors import ImagenetError
from data.ilsvrc12 import AUX_ARCHIVE, LISTING_FILES, TRAIN_ARCHIVE, TRAIN_DIR, VAL_ARCHIVE, VAL_DIR
from tasks.cache import file_digest, write_manifest
from tasks.stage import (ProgressArtifact, RecordedKey, StageResult, abortable_sleep,
                         fail_in_one_line)

DOWNLOADS_DIR = "downloads"
# A source spelled `mini` or `mini:<size>` (a data.mini.SIZES preset) is that archive of the
# built-in mini ILSVRC12, built once under <data root>/mini-ilsvrc12-<size>/ (build_mini).
MINI_SOURCE = "mini"
MINI_DEFAULT_SIZE = "default"
MINI_DIR = "mini-ilsvrc12-{size}"
MINI_SEED = 0
MINI_ARCHIVES = {"train": TRAIN_ARCHIVE, "val": VAL_ARCHIVE, "aux": AUX_ARCHIVE}
MINI_CHECKSUMS = "MD5SUMS"
# Library modules whose source is part of each stage's cache key.
MINI_CODE = ("data.mini", "data.devkit_meta")
DOWNLOAD_CODE = ("data.download",)
EXTRACT_CODE = ("data.extract",)
LISTINGS_CODE = ("data.listings", "data.ilsvrc12")
# Prefect retries on top of the downloader's own backoff: for a link that stays down longer.
DOWNLOAD_RETRIES = 3
DOWNLOAD_RETRY_DELAYS_S = [10, 60, 300]
# HTTP statuses worth retrying (the server is busy or broken for a while), as in data.download.
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT,
                              errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH,
                              errno.ENETUNREACH})
MIB = 2**20


def is_transient(exc: BaseException | None) -> bool:
    """A network failure that may go away by itself (never a 4xx, a checksum mismatch or a
    user error)."""
    if exc is None:
        return False
    if isinstance(exc, TransientDownloadError):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in TRANSIENT_HTTP
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(status, int) and 400 <= status < 600:
        return status in TRANSIENT_HTTP
    if isinstance(exc, (TimeoutError, socket.timeout, ConnectionError)):
        return True
    if isinstance(exc, urllib.error.URLError):
        return is_transient(exc.reason) if isinstance(exc.reason, BaseException) else True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


class TransientDownloadError(RuntimeError):
    """data.download gave up after its own retries on a transient failure (a dropped link, 5xx):
    worth another Prefect retry later, which resumes the .part file."""


# data.download reports "gave up after its retries" as an ImagenetError with this phrase (its
# transient cause is suppressed); everything else it raises (4xx, checksum) is final.
_GAVE_UP_PHRASE = "failed after"


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry a download only for transient network errors."""
    try:
        state.result()
    except Exception as exc:  # the failure we are classifying
        return is_transient(exc)
    return False


def archive_name(source: str) -> str:
    """The file name an archive gets under downloads/: the URL's or the path's last part."""
    path = urlparse(source).path if "://" in source else source
    name = Path(path).name
    if not name:
        raise ValueError(f"source {source!r} does not end in a file name")
    return name


def download_identity(source: str, md5: str | None) -> dict[str, str | None]:
    """What a download's cache key is made of: the archive's name and md5 when a checksum is
    known (the same bytes from another mirror or port are the same archive), else its URL."""
    from data.download import expected_md5

    name = archive_name(source)
    want = expected_md5(name, md5)
    return {"name": name, "md5": want} if want else {"source": source}


def archive_path(data_root: Path | str, source: str) -> Path:
    return Path(data_root) / DOWNLOADS_DIR / archive_name(source)


def mini_size(source: str | None) -> str | None:
    """The data.mini.SIZES preset a source names (`mini` -> "default", `mini:tiny` -> "tiny"),
    or None when it is a real URL or path."""
    if source is None:
        return None
    scheme, colon, size = source.partition(":")
    if scheme != MINI_SOURCE or (colon and "/" in size):
        return None
    from data.mini import SIZES

    size = size or MINI_DEFAULT_SIZE
    if size not in SIZES:
        raise ImagenetError(f"source {source!r}: unknown mini size {size!r}; valid: "
                            f"{', '.join(f'{MINI_SOURCE}:{k}' for k in SIZES)}")
    return size


def mini_dir(data_root: Path | str, size: str) -> Path:
    return Path(data_root) / MINI_DIR.format(size=size)


def mini_outputs(data_root: Path | str, size: str) -> dict[str, Path]:
    """The mini archives (by kind) and their MD5SUMS ("checksums")."""
    folder = mini_dir(data_root, size)
    return {**{kind: folder / name for kind, name in MINI_ARCHIVES.items()},
            "checksums": folder / MINI_CHECKSUMS}


@task(cache_policy=RecordedKey())
@fail_in_one_line
def build_mini(cache_key: str, data_root: str, size: str) -> StageResult:
    """Write the mini ILSVRC12 (data.mini, preset `size`) under the data root: the archives the
    download stage then verifies against its MD5SUMS and uses in place."""
    from data.mini import SIZES, make_mini_ilsvrc12

    log = get_run_logger()
    classes, train, val = SIZES[size]
    outputs = mini_outputs(data_root, size)
    progress = ProgressArtifact(f"mini ILSVRC12 ({size}): {classes} classes x ({train} train + "
                                f"{val} val) images")
    result = make_mini_ilsvrc12(mini_dir(data_root, size), classes=classes, train_per_class=train,
                                val_per_class=val, seed=MINI_SEED, progress=progress)
    progress.finish()
    for path in outputs.values():
        digest = file_digest(path)
        write_manifest(path, stage="mini", key=cache_key, digest=digest, content=f"sha256:{digest}")
    seconds = time.monotonic() - progress.started
    images = result.train_images + result.val_images
    log.info("mini ILSVRC12 (%s) written to %s: %d images in %.1f s", size, result.outdir,
             images, seconds)
    return StageResult(stage="mini", key=cache_key,
                       outputs={kind: str(path) for kind, path in outputs.items()},
                       record={"size": size, "train_images": result.train_images,
                               "val_images": result.val_images},
                       seconds=seconds,
                       throughput=f"{images / seconds:.0f} img/s" if seconds > 0 else "")


@task(cache_policy=RecordedKey(), retries=DOWNLOAD_RETRIES,
      retry_delay_seconds=DOWNLOAD_RETRY_DELAYS_S, retry_condition_fn=retry_if_transient)
@fail_in_one_line
def download_archive(cache_key: str, source: str, data_root: str, md5: str | None = None) -> StageResult:
    """Fetch one archive into downloads/ (resuming, md5-verified). A local path is verified and
    used in place: downloads/<name> becomes a symlink to it, so the manifest has a home."""
    from data.download import download

    log = get_run_logger()
    dest = archive_path(data_root, source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    progress = ProgressArtifact(f"download {dest.name} (bytes)")
    log.info("downloading %s -> %s", source, dest)
    try:
        result = download(source, dest.parent, md5=md5, filename=dest.name, progress=progress,
                          sleep=abortable_sleep)
    except ImagenetError as err:
        if _GAVE_UP_PHRASE in str(err):
            raise TransientDownloadError(str(err)) from err
        raise
    progress.finish()
    got = Path(result.path)
    if got.resolve() != dest.resolve():
        # Used in place: point downloads/<name> at it (atomically) rather than copy 147 GB;
        # relatively when it is inside the data root, so the link moves with the root.
        target = got.resolve()
        if target.is_relative_to(Path(data_root).resolve()):
            target = Path(os.path.relpath(target, dest.parent.resolve()))
        tmp = dest.with_name(dest.name + f".link{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, dest)
    seconds = float(result.seconds)
    mb_s = result.bytes / MIB / seconds if seconds > 0 else 0.0
    digest = "md5:" + result.md5 if result.md5 else "sha256:" + file_digest(dest)
    record = {"bytes": int(result.bytes), "md5": result.md5, "resumed": bool(result.resumed),
              "reused_in_place": bool(getattr(result, "reused_in_place", False)), "source": source}
    write_manifest(dest, stage="download", key=cache_key, digest=digest, record=record,
                   content=digest)
    log.info("%s: %.1f MB in %.1f s (%.1f MB/s)", dest.name, result.bytes / MIB, seconds, mb_s)
    return StageResult(stage="download", key=cache_key, outputs={"archive": str(dest)},
                       record=record, seconds=seconds, throughput=f"{mb_s:.1f} MB/s")


def _extract(kind: str, cache_key: str, archive: str, data_root: str) -> StageResult:
    from data import extract as lib

    log = get_run_logger()
    start = time.monotonic()
    out = Path(data_root) / (TRAIN_DIR if kind == "train" else VAL_DIR)
    fn = lib.extract_train if kind == "train" else lib.extract_val
    log.info("extracting %s -> %s", archive, out)
    progress = ProgressArtifact(f"extract {kind} (bytes of {Path(archive).name})")
    result = fn(Path(archive), Path(data_root), progress=progress)
    progress.finish()
    seconds = float(getattr(result, "seconds", time.monotonic() - start))
    record = {k: v for k, v in vars(result).items()
              if isinstance(v, (int, float, str, bool)) and k != "seconds"}
    nbytes = int(record.get("bytes", 0))
    files = int(record.get("files", 0)) + int(record.get("skipped_files", 0))
    mb_s = nbytes / MIB / seconds if seconds > 0 else 0.0
    # The tree's identity is the archive it came from plus what came out of it: hashing 1.28 M
    # files on every run would cost minutes for nothing. Its manifest's content (names and
    # sizes, tasks.cache.tree_digest) is what a moved tree is re-verified by.
    write_manifest(out, stage=f"extract_{kind}", key=cache_key, digest=cache_key, record=record)
    log.info("extracted %s: %s files, %.1f MB/s", kind, files, mb_s)
    return StageResult(stage=f"extract_{kind}", key=cache_key, outputs={kind: str(out)},
                       record=record, seconds=seconds, throughput=f"{mb_s:.1f} MB/s")


@task(cache_policy=RecordedKey())
@fail_in_one_line
def extract_train(cache_key: str, archive: str, data_root: str) -> StageResult:
    """Extract the train tar of per-synset tars into train/<wnid>/."""
    return _extract("train", cache_key, archive, data_root)


@task(cache_policy=RecordedKey())
@fail_in_one_line
def extract_val(cache_key: str, archive: str, data_root: str) -> StageResult:
    """Extract the flat val tar into val/."""
    return _extract("val", cache_key, archive, data_root)


def listing_paths(data_root: Path | str) -> dict[str, Path]:
    return {name: Path(data_root) / name for name in LISTING_FILES}


@task(cache_policy=RecordedKey())
@fail_in_one_line
def write_listings(cache_key: str, data_root: str, aux: str | None = None) -> StageResult:
    """synsets.txt, synset_words.txt, train.txt, val.txt (Caffe's formats), from the aux
    tarball, checked against the extracted trees."""
    from data import listings as lib

    log = get_run_logger()
    start = time.monotonic()
    result = lib.write_listings(Path(data_root), aux=Path(aux) if aux else None)
    record = {"source": result.source, **{k: int(v) for k, v in result.counts.items()},
              "notes": list(result.notes)}
    outputs = {}
    for name, path in listing_paths(data_root).items():
        digest = file_digest(path)
        write_manifest(path, stage="listings", key=cache_key, digest=digest,
                       content=f"sha256:{digest}")
        outputs[name] = str(path)
    log.info("listings written: %s", record)
    return StageResult(stage="listings", key=cache_key, outputs=outputs, record=record,
                       seconds=time.monotonic() - start)
