"""The pipeline's cache policy: stage keys, input fingerprints and output manifests.

A stage reruns exactly when its inputs, parameters or code changed, or its recorded outputs are
gone or no longer match (like `dvc repro`). Prefect's cache lookup alone cannot do the second
half: a cache hit only means a record exists, and a key that includes the task's own outputs is
computed before the body runs (PREFECT_NOTES: deleting the output still reported Cached). So:

1. `stage_key(stage, code=..., inputs=..., params=...)` hashes the stage name, the source of the
   library modules it runs, a fingerprint of every input and its parameters. The flow computes it
   and passes it to the task as `cache_key`; `RecordedKey` (the tasks' cache policy) uses it.
2. Every output gets a small manifest JSON (`<output>.manifest.json`) written by the stage that
   produced it: the key that produced it, a content digest, and the output's stat at that time.
3. Before calling a stage the flow asks `outputs_valid(outputs, key)`; when False it passes
   `refresh_cache=True`, so the body runs even though a record with that key exists.

Fingerprints: small files (prototxts, listings) by content; large files (the ILSVRC12 archives)
by size + mtime + inode, never read; LMDBs, mean files and extracted trees by the digest their
producing stage recorded in the manifest, so a rebuilt but identical LMDB (whose data.mdb bytes
differ, PREFECT_NOTES) does not invalidate the mean or the training downstream.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from data.errors import ImagenetError

MANIFEST_SUFFIX = ".manifest.json"
# Files up to this size are fingerprinted by their bytes (prototxts, listings: cheap to hash and
# robust to `touch`); anything larger by stat, because hashing a 147 GB archive on every run is
# exactly the cost the cache exists to avoid.
CONTENT_HASH_MAX_BYTES = 64 * 2**20
# An LMDB environment is a folder whose records live in this file.
LMDB_DATA_FILE = "data.mdb"
MANIFEST_VERSION = 1


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


def file_digest(path: Path | str, chunk: int = 2**20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(output: Path | str) -> dict[str, Any] | None:
    """The manifest of `output`, or None when absent or unreadable (treated as 'not produced')."""
    try:
        return json.loads(manifest_path(output).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_manifest(
    output: Path | str, *, stage: str, key: str, digest: str, record: Mapping[str, Any] | None = None
) -> Path:
    """Record that `stage` (cache key `key`) produced `output` with content `digest`.

    Written to a temporary name and renamed, so a killed stage never leaves a manifest that
    looks finished; it is written last, after the output itself is complete."""
    output = Path(output)
    if not output.exists():
        raise ImagenetError(f"stage {stage}: cannot record {output}: it does not exist")
    body = {
        "version": MANIFEST_VERSION,
        "stage": stage,
        "key": key,
        "digest": digest,
        "stat": stat_fingerprint(output),
        "record": dict(record or {}),
    }
    path = manifest_path(output)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def manifest_matches(output: Path | str, key: str | None = None) -> bool:
    """True when `output` exists, has a manifest, is unchanged since (same stat), and, when
    `key` is given, was produced by that key."""
    manifest = read_manifest(output)
    if manifest is None or manifest.get("version") != MANIFEST_VERSION:
        return False
    if key is not None and manifest.get("key") != key:
        return False
    return manifest.get("stat") == stat_fingerprint(output)


def stale_reason(outputs: Iterable[Path | str], key: str) -> str:
    """Why a stage's recorded outputs cannot be used with `key` ('' when they can)."""
    for p in outputs:
        manifest = read_manifest(p)
        if manifest is None or manifest.get("version") != MANIFEST_VERSION:
            return "no recorded outputs"
        if manifest.get("stat") != stat_fingerprint(p):
            return "outputs missing or changed"
        if manifest.get("key") != key:
            return "inputs, params or code changed"
    return ""


def outputs_valid(outputs: Iterable[Path | str], key: str) -> bool:
    """Whether every recorded output of a stage is present and produced by `key`. The flow
    passes refresh_cache=True to the stage when this is False."""
    return all(manifest_matches(p, key) for p in outputs)


def input_fingerprint(path: Path | str) -> str:
    """What an input contributes to a stage key (see the module docstring)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is not None and manifest_matches(path):
        return "digest:" + str(manifest["digest"])
    if path.is_file():
        st = path.stat()
        if st.st_size <= CONTENT_HASH_MAX_BYTES:
            return "sha256:" + file_digest(path)
        return "stat:" + stat_fingerprint(path)
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
