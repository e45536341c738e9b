"""The pipeline's cache policy: stage keys, input fingerprints and output manifests.

A stage reruns exactly when its inputs, parameters or code changed, or its recorded outputs are
gone or no longer match (like `dvc repro`). Prefect's cache lookup alone cannot do the second
half: a cache hit only means a record exists, and a key that includes the task's own outputs is
computed before the body runs (PREFECT_NOTES: deleting the output still reported Cached). So:

1. `stage_key(stage, code=..., inputs=..., params=...)` hashes the stage name, the source of the
   library modules it runs, a fingerprint of every input and its parameters. The flow computes it
   and passes it to the task as `cache_key`; `RecordedKey` (the tasks' cache policy) uses it.
2. Every output gets a small manifest JSON (`<output>.manifest.json`) written by the stage that
   produced it: the key that produced it, a digest downstream keys use, how to re-verify its
   content (`content`), and where it was and its stat at that time.
3. Before calling a stage the flow asks `stale_reason(outputs, key)`; when not empty it passes
   `refresh_cache=True`, so the body runs even though a record with that key exists.

Fingerprints: small files (prototxts, listings) by content; large files without a manifest by
size + mtime, never read; archives, LMDBs, mean files and extracted trees by the digest their
producing stage recorded in the manifest, so a rebuilt but identical LMDB (whose data.mdb bytes
differ, PREFECT_NOTES) does not invalidate the mean or the training downstream. No key holds a
path or an inode: a data root that is copied or moved (another folder, disk or host) keeps its
keys.

Whether a recorded output is still the one recorded (`verified_manifest`): the cheap check
first, its stat (size, mtime, and the inode where it is still at the recorded path). A copy
(`cp -a`, `rsync -a`) or a move keeps size and mtime but not the path or inode, so an output
found elsewhere with the recorded size and mtime is taken as itself. Anything else (another
mtime: `cp` without -a, another filesystem's timestamps; the same path with a new inode) is
re-verified by content: the file's sha256 or md5, an LMDB's record digest, a tree's file names
and sizes, against what the manifest recorded; a match is as good as never having moved, and
the manifest is re-recorded at the new place so the next run takes the cheap path. A changed
output fails both and its stage reruns.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from data.atomic import write_bytes_atomic
from data.errors import ImagenetError

MANIFEST_SUFFIX = ".manifest.json"
# Files up to this size are fingerprinted by their bytes (prototxts, listings: cheap to hash and
# robust to `touch`); anything larger by stat, because hashing a 147 GB archive on every run is
# exactly the cost the cache exists to avoid.
CONTENT_HASH_MAX_BYTES = 64 * 2**20
# An LMDB environment is a folder whose records live in this file.
LMDB_DATA_FILE = "data.mdb"
# 2: `content` and `location` (what a moved output is re-verified by). Version 1 manifests are
# still read, with version 1's check (the exact stat, inode included; no re-verification).
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, MANIFEST_VERSION)
# How a manifest's `content` says what to recompute: "<scheme>:<hex>".
CONTENT_SHA256, CONTENT_MD5, CONTENT_LMDB, CONTENT_TREE = "sha256", "md5", "lmdb", "tree"
HASH_CHUNK = 2**20
STALE_MISSING = "outputs missing or changed"
STALE_UNRECORDED = "no recorded outputs"
STALE_KEY = "inputs, params or code changed"
log = logging.getLogger(__name__)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always hashes the same."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def manifest_path(output: Path | str) -> Path:
    """Where the manifest of `output` lives: beside it, named after it."""
    output = Path(output)
    return output.with_name(output.name + MANIFEST_SUFFIX)


def stat_fingerprint(path: Path | str) -> str:
    """size:mtime_ns:inode of a file; of an LMDB folder's data.mdb; of a plain folder itself
    (its mtime changes when entries are added or removed). 'missing' when absent."""
    path = Path(path)
    target = path / LMDB_DATA_FILE if (path / LMDB_DATA_FILE).is_file() else path
    try:
        st = target.stat()
    except FileNotFoundError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _hash_file(path: Path | str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path | str) -> str:
    """sha256 of a file's bytes."""
    return _hash_file(path, "sha256")


def tree_digest(path: Path | str) -> str:
    """sha256 over the relative names and sizes of the regular files under a folder (hidden
    names, our temporaries, left out): what an extracted tree is re-verified by. Hashing the
    bytes of 1.28 M images would cost as much as extracting them again; names and sizes catch
    a missing, added, truncated or renamed file, a walk of the tree's metadata."""
    root = Path(path)
    h = hashlib.sha256()
    stack = [""]
    while stack:
        rel = stack.pop()
        prefix = f"{rel}/" if rel else ""
        with os.scandir(root / rel if rel else root) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        folders, lines = [], []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(prefix + entry.name)
            elif entry.is_file(follow_symlinks=False):
                lines.append(f"{prefix}{entry.name}\0{entry.stat(follow_symlinks=False).st_size}\n")
        h.update("".join(lines).encode("utf-8", "surrogateescape"))  # one call per folder
        stack.extend(reversed(folders))  # depth first, in name order
    return h.hexdigest()


def _lmdb_digest(path: Path | str) -> str:
    from data.lmdb_io import lmdb_content_digest

    return lmdb_content_digest(path)


# What `content` schemes recompute (verified_manifest).
_CONTENT: dict[str, Callable[[Path], str]] = {
    CONTENT_SHA256: file_digest,
    CONTENT_MD5: lambda p: _hash_file(p, "md5"),
    CONTENT_LMDB: _lmdb_digest,
    CONTENT_TREE: tree_digest,
}


def content_digest(output: Path | str) -> str:
    """`<scheme>:<hex>` of an output as it is now: an LMDB's record digest, a folder's tree
    digest, a file's sha256."""
    output = Path(output)
    if (output / LMDB_DATA_FILE).is_file():
        return f"{CONTENT_LMDB}:{_lmdb_digest(output)}"
    if output.is_dir():
        return f"{CONTENT_TREE}:{tree_digest(output)}"
    return f"{CONTENT_SHA256}:{file_digest(output)}"


def read_manifest(output: Path | str) -> dict[str, Any] | None:
    """The manifest of `output`, or None when absent or unreadable (treated as 'not produced')."""
    try:
        return json.loads(manifest_path(output).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _location(output: Path) -> str:
    """Where an output is: its absolute path (not resolved: a symlink is its own place)."""
    return os.path.abspath(output)


def _write_body(output: Path, body: Mapping[str, Any]) -> Path:
    path = manifest_path(output)
    write_bytes_atomic(path, json.dumps(body, indent=1, sort_keys=True, default=str).encode(),
                       durable=False)
    return path


def write_manifest(
    output: Path | str, *, stage: str, key: str, digest: str,
    record: Mapping[str, Any] | None = None, content: str | None = None,
) -> Path:
    """Record that `stage` (cache key `key`) produced `output`; `digest` is what downstream
    keys use. `content` (`<scheme>:<hex>`, e.g. "sha256:...", "lmdb:...") is what a moved
    output is re-verified by; computed here (content_digest) when the caller has not got it.

    Written to a temporary name and renamed, so a killed stage never leaves a manifest that
    looks finished; it is written last, after the output itself is complete."""
    output = Path(output)
    if not output.exists():
        raise ImagenetError(f"stage {stage}: cannot record {output}: it does not exist")
    if content is None:
        content = content_digest(output)
    scheme = content.partition(":")[0]
    if scheme not in _CONTENT:
        raise ValueError(f"manifest content {content!r}: unknown scheme; valid: "
                         f"{', '.join(_CONTENT)}")
    return _write_body(output, {
        "version": MANIFEST_VERSION,
        "stage": stage,
        "key": key,
        "digest": digest,
        "content": content,
        "location": _location(output),
        "stat": stat_fingerprint(output),
        "record": dict(record or {}),
    })


def _same_stat_elsewhere(manifest: Mapping[str, Any], output: Path, stat: str) -> bool:
    """The output is at another path than recorded (its data root was copied or moved) with
    the recorded size and mtime: a copy or a move keeps those, not the inode. A plain folder's
    size is its filesystem's bookkeeping (a copy's entries may pack into fewer blocks), so a
    folder is compared by its mtime alone."""
    if manifest.get("location") in (None, _location(output)):
        return False
    size, mtime = stat.split(":")[:2]
    was_size, was_mtime = (str(manifest.get("stat", "")).split(":") + ["", ""])[:2]
    folder = output.is_dir() and not (output / LMDB_DATA_FILE).is_file()
    return mtime == was_mtime and (folder or size == was_size)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow or task run's logger (shown in the UI) where there is one, else this module's."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a run (the CLI, tests): MissingContextError
        return log


# Outputs re-verified by content in this process that could not be re-recorded (a read-only
# data root): (location, stat) -> content, so they are hashed once per process, not per check.
_verified_here: dict[tuple[str, str], str] = {}


def verified_manifest(output: Path | str) -> dict[str, Any] | None:
    """The manifest of `output` when the output is still what it recorded (module docstring:
    the stat, else the content), else None. A moved or copied output that passes is
    re-recorded at its new place (same key, digest and record)."""
    output = Path(output)
    manifest = read_manifest(output)
    if manifest is None or manifest.get("version") not in READABLE_VERSIONS:
        return None
    stat = stat_fingerprint(output)
    if stat == "missing":
        return None
    if manifest.get("stat") == stat and manifest.get("location") in (None, _location(output)):
        return manifest
    content = manifest.get("content")
    if manifest.get("version") != MANIFEST_VERSION or not content:
        return None
    how = "found with the recorded size and mtime"
    if not _same_stat_elsewhere(manifest, output, stat):
        memo = (_location(output), stat)
        if _verified_here.get(memo) != content:
            scheme, _, want = str(content).partition(":")
            recompute = _CONTENT.get(scheme)
            try:
                if recompute is None or recompute(output) != want:
                    return None
            except (OSError, ImagenetError) as err:
                log.debug("re-verifying %s by content failed: %s", output, err)
                return None
            _verified_here[memo] = content
        how = f"re-verified by content ({scheme})"
    _logger().info("%s: moved or copied since its stage recorded it at %s; %s", output,
                   manifest.get("location"), how)
    moved = {**manifest, "location": _location(output), "stat": stat}
    try:
        _write_body(output, moved)
    except OSError as err:  # a read-only data root: verified, just not re-recorded
        log.debug("could not re-record %s: %s", manifest_path(output), err)
    return moved


def manifest_matches(output: Path | str, key: str | None = None) -> bool:
    """True when `output` exists, has a manifest, is what it recorded (verified_manifest),
    and, when `key` is given, was produced by that key."""
    manifest = verified_manifest(output)
    return manifest is not None and (key is None or manifest.get("key") == key)


def stale_reason(outputs: Iterable[Path | str], key: str) -> str:
    """Why a stage's recorded outputs cannot be used with `key` ('' when they can)."""
    for p in outputs:
        manifest = read_manifest(p)
        if manifest is None or manifest.get("version") not in READABLE_VERSIONS:
            return STALE_UNRECORDED
        if stat_fingerprint(p) == "missing":
            return STALE_MISSING
        if manifest.get("key") != key:  # before re-verifying: no content hashed for nothing
            return STALE_KEY
        if verified_manifest(p) is None:
            return STALE_MISSING
    return ""


def outputs_valid(outputs: Iterable[Path | str], key: str) -> bool:
    """Whether every recorded output of a stage is present and produced by `key`. The flow
    passes refresh_cache=True to the stage when this is False."""
    return not stale_reason(outputs, key)


def input_fingerprint(path: Path | str) -> str:
    """What an input contributes to a stage key (see the module docstring)."""
    path = Path(path)
    manifest = verified_manifest(path)
    if manifest is not None:
        return "digest:" + str(manifest["digest"])
    if path.is_file():
        st = path.stat()
        if st.st_size <= CONTENT_HASH_MAX_BYTES:
            return "sha256:" + file_digest(path)
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    if not path.exists():
        raise ImagenetError(f"stage input {path} does not exist (has its producing stage run?)")
    raise ImagenetError(
        f"stage input {path} is a folder with no valid manifest ({manifest_path(path)}): "
        "it was not produced by this pipeline or was changed since; rerun its producing stage"
    )


def code_digest(modules: Iterable[str]) -> str:
    """sha256 over the source files of `modules` (dotted names; a package means all its .py
    files), found without importing them, so that editing a library reruns exactly the stages
    that use it."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        for label, source in _module_sources(name):
            h.update(label.encode() + b"\0" + source.read_bytes() + b"\0")
    return h.hexdigest()


def _module_sources(name: str) -> list[tuple[str, Path]]:
    """The .py files of module `name`; of every module under it when it is a package."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImagenetError(f"cache policy: module {name!r} not found (is it installed?)")
    if not spec.submodule_search_locations:
        return [(name, Path(spec.origin))]
    out = []
    for location in spec.submodule_search_locations:
        root = Path(location)
        for path in sorted(root.rglob("*.py")):
            out.append((f"{name}/{path.relative_to(root).as_posix()}", path))
    return out


def stage_key(
    stage: str,
    *,
    code: Iterable[str] = (),
    inputs: Mapping[str, Path | str | None] | None = None,
    params: Mapping[str, Any] | None = None,
) -> str:
    """The cache key of one stage run: stage name, code, input fingerprints, parameters."""
    fingerprints = {
        name: (None if p is None else input_fingerprint(p)) for name, p in (inputs or {}).items()
    }
    body = {
        "stage": stage,
        "code": code_digest(code),
        "inputs": fingerprints,
        "params": dict(params or {}),
    }
    return f"{stage}-{_sha256(canonical_json(body).encode())[:40]}"
