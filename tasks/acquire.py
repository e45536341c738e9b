"""Acquisition stages as Prefect tasks: build the built-in mini ILSVRC12 when the sources ask for
it, download each archive, extract train and val, write the listings. The work is done by
data.mini, data.download, data.extract and data.listings; this module adds the mirror
credentials from a Prefect Secret block, progress artifacts and the output manifests. Downloads
are retried by data.download's policy alone (transient failures only; see DownloadError).

Layout under the data root (data/ilsvrc12.py names it): downloads/<archive>, train/<wnid>/...,
val/..., synsets.txt, synset_words.txt, train.txt, val.txt; mini-ilsvrc12-<size>/ for the mini.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from prefect import task
from prefect.logging import get_run_logger

from data.atomic import symlink_atomic
from data.errors import ImagenetError
from data.ilsvrc12 import AUX_ARCHIVE, LISTING_FILES, TRAIN_ARCHIVE, TRAIN_DIR, VAL_ARCHIVE, VAL_DIR
from tasks import redact
from tasks.cache import CONTENT_TREE, file_digest, tree_digest, write_manifest
from tasks.stage import (ProgressArtifact, RecordedKey, StageResult, abortable_sleep,
                         fail_in_one_line)

redact.install()  # no credential of a source URL in any log line, Prefect's own included

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
# No Prefect retries on downloads: data.download's retry policy is the only one (which failures
# are transient, how often and how long to retry). Each of its retries resumes with the md5 state
# it holds in memory; a Prefect retry would re-enter the task and hash the .part again (100 GB
# read after a drop at 100 GB) and could not honour Retry-After.
SECRET_BLOCK = "imagenet-mirror-credentials"  # data.download.SECRET_BLOCK: the README names it
SOURCE_HINT = ("give the archive through the `sources` parameter (imagenet pipeline: --train, "
               "--val, --aux): a reachable mirror's URL or a local path, or `mini` for the "
               "built-in mini set; mirror credentials through the Prefect Secret block "
               f"{SECRET_BLOCK!r} or IMAGENET_USERNAME/IMAGENET_PASSWORD or IMAGENET_TOKEN")
MIB = 2**20


def mirror_secret() -> tuple[Any, dict[str, str]]:
    """(Credentials or None, signed URLs by download.source_key) from the Prefect Secret block
    SECRET_BLOCK, when it exists. Its value is JSON (an object, or a string holding one):
    {"username": ..., "password": ...} or {"token": ...}, and optionally "urls": a list of
    credentialed URLs (signed ones whose query carries the secret); a flow parameter names
    such a URL without its secret parts."""
    from prefect.blocks.system import Secret

    from data import download as dl

    try:
        block = Secret.load(SECRET_BLOCK, _sync=True)  # type: ignore[call-arg]
    except ValueError:  # no such block: the environment's credentials apply
        return None, {}
    value = block.get()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict):
        raise ImagenetError(f"Prefect Secret block {SECRET_BLOCK!r}: its value must be a JSON "
                            'object like {"username": "...", "password": "..."} or {"token": '
                            '"..."}, optionally with "urls": ["https://...signed..."]')
    urls = value.get("urls") or []
    if isinstance(urls, dict):
        urls = list(urls.values())
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ImagenetError(f"Prefect Secret block {SECRET_BLOCK!r}: \"urls\" must be a list "
                            "of URLs")
    return dl.Credentials.from_mapping(value), {dl.source_key(u): u for u in urls}


def refuse_credentials(sources: Mapping[str, Any]) -> str:
    """'' when no source carries a credential in clear; else the one-line reason a flow run
    refuses it (its parameters are stored in Prefect's database)."""
    from data.download import carries_credentials

    named = [k for k, v in sources.items() if isinstance(v, str) and carries_credentials(v)]
    if not named:
        return ""
    return (f"sources.{named[0]} holds a credential in clear (user:password@ or a secret query "
            "value), and flow-run parameters are stored in Prefect's database: pass the URL "
            f"without it and put the credentials in the Prefect Secret block {SECRET_BLOCK!r} "
            '({"username": ..., "password": ...} or {"token": ...}; signed URLs under "urls") '
            "or IMAGENET_USERNAME/IMAGENET_PASSWORD or IMAGENET_TOKEN in the worker's "
            "environment (`imagenet pipeline` keeps URLs given to it out of the parameters)")


def masked_sources(sources: Mapping[str, Any]) -> dict[str, Any]:
    """The sources with every URL masked (for a stored copy of the parameters)."""
    from data.download import mask_url

    return {k: mask_url(v) if isinstance(v, str) and "://" in v else v
            for k, v in sources.items()}


def check_local_sources(sources: Mapping[str, str]) -> dict[str, str]:
    """{kind: one-line problem} for the sources that are local paths and missing, found before
    any download starts (so nothing is left downloading beside a run that cannot go on)."""
    from data.download import DownloadError, is_url, local_path, reveal_url

    problems = {}
    for kind, source in sources.items():
        try:
            source = reveal_url(source)
        except DownloadError:
            continue  # a masked signed URL: the download reports it, with the Secret's URLs
        if is_url(source) and not source.lower().startswith("file://"):
            continue
        try:
            local_path(source)
        except DownloadError as err:
            problems[kind] = f"{err}; {SOURCE_HINT}"
    return problems


def fetch_checksums(source: str | None) -> dict[str, str]:
    """{archive name: md5} from an md5sum-format file (URL or path), with the download's
    credentials and retry policy; {} without one."""
    from data import download as dl
    from data.ilsvrc12 import parse_md5sums

    if not source:
        return {}
    credentials, urls = mirror_secret() if "://" in source else (None, {})
    real = dl.reveal_url(source, urls)
    body = dl.fetch_bytes(real, credentials=credentials)
    try:
        text = body.decode()
    except UnicodeDecodeError as err:
        raise ImagenetError(f"{dl.mask_url(source)}: not a text md5sum list ({err.reason} at "
                            f"byte {err.start})") from None
    return parse_md5sums(text, dl.mask_url(source))


def archive_name(source: str) -> str:
    """The file name an archive gets under downloads/: the URL's or the path's last part."""
    path = urlparse(source).path if "://" in source else source
    name = Path(path).name
    if not name:
        from data.download import mask_url

        raise ImagenetError(f"source {mask_url(source)!r} does not end in a file name")
    return name


def download_identity(source: str, md5: str | None) -> dict[str, str | None]:
    """What a download's cache key is made of: the archive's name and md5 when a checksum is
    known (the same bytes from another mirror or port are the same archive), else its URL."""
    from data.download import expected_md5, source_key

    name = archive_name(source)
    want = expected_md5(name, md5)
    # Without a checksum: the URL without its secrets (a new password is the same archive).
    return {"name": name, "md5": want} if want else {"source": source_key(source)}


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
                                f"{val} val) images", unit="images")
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


@task(cache_policy=RecordedKey())
@fail_in_one_line
def download_archive(cache_key: str, source: str, data_root: str, md5: str | None = None) -> StageResult:
    """Fetch one archive into downloads/ (resuming, md5-verified, retried by data.download's
    policy). A local path is verified and used in place: downloads/<name> becomes a symlink to
    it, so the manifest has a home. `source` is never a credentialed URL (flow parameters hold
    none): its secrets come from this process (download.hide_url), the Secret block or the
    environment, and only its masked form is logged or recorded."""
    from data import download as dl

    log = get_run_logger()
    dest = archive_path(data_root, source)
    shown = dl.mask_url(source) if "://" in source else source
    credentials, urls = mirror_secret() if "://" in source else (None, {})
    real = dl.reveal_url(source, urls)
    progress = ProgressArtifact(f"download {dest.name} (bytes)")
    log.info("downloading %s -> %s", shown, dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        result = dl.download(real, dest.parent, md5=md5, filename=dest.name, progress=progress,
                             credentials=credentials, sleep=abortable_sleep)
    except dl.DownloadError as err:
        if err.unreachable:
            raise dl.DownloadError(f"{err}; {SOURCE_HINT}", transient=err.transient,
                                   unreachable=True) from None
        raise
    progress.finish()
    got = Path(result.path)
    if got.resolve() != dest.resolve():
        # Used in place: point downloads/<name> at it (atomically) rather than copy 147 GB;
        # relatively when it is inside the data root, so the link moves with the root.
        target = got.resolve()
        if target.is_relative_to(Path(data_root).resolve()):
            target = Path(os.path.relpath(target, dest.parent.resolve()))
        symlink_atomic(dest, target)
    seconds = float(result.seconds)
    mb_s = result.bytes / MIB / seconds if seconds > 0 else 0.0
    digest = "md5:" + result.md5 if result.md5 else "sha256:" + file_digest(dest)
    record = {"bytes": int(result.bytes), "md5": result.md5, "resumed": bool(result.resumed),
              "reused_in_place": bool(getattr(result, "reused_in_place", False)),
              "source": shown}
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
    # Files/s too: at ILSVRC12's 1.28 M files the per-file work (headers, creating files)
    # weighs as much as the bytes, and for small images more.
    rate = f"{files / seconds:,.0f} files/s, {mb_s:.1f} MB/s" if seconds > 0 else ""
    # The tree's identity is the archive it came from plus what came out of it: hashing 1.28 M
    # files on every run would cost minutes for nothing. Its manifest's content (names and
    # sizes, tasks.cache.tree_digest: one walk of the tree now) is what a moved tree is
    # re-verified by.
    walked = time.monotonic()
    content = f"{CONTENT_TREE}:{tree_digest(out)}"
    log.info("recorded the names and sizes of the %s tree in %.1f s", kind,
             time.monotonic() - walked)
    write_manifest(out, stage=f"extract_{kind}", key=cache_key, digest=cache_key, record=record,
                   content=content)
    log.info("extracted %s: %s files, %s", kind, f"{files:,}", rate)
    return StageResult(stage=f"extract_{kind}", key=cache_key, outputs={kind: str(out)},
                       record=record, seconds=seconds, throughput=rate)


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
