"""Training and evaluation stages as Prefect tasks, on model.train.

Training is a chain of segment tasks, one per snapshot interval: segment k trains from the
snapshot at its start iteration to its end iteration and leaves `<prefix>_iter_<end>` on disk.
Each is cached on (net, solver, data digests, model code, end iteration), so a rerun of the flow
skips finished segments, and retries resume from the newest snapshot on disk, so a crash costs
at most one interval (Caffe itself can only restart by hand with `caffe train --snapshot`).

`prepare_training` is the thin adapter between the user's solver/net prototxts and this data
root: it writes copies whose Data layers read this run's LMDBs and mean file (ImageData layers
its listings and extracted images) and whose
snapshot_prefix lives under `training/<config id>/`, a folder named after everything the weights
depend on, so snapshots of another configuration are never resumed by mistake.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from google.protobuf import text_format
from prefect import task
from prefect.logging import get_run_logger
from prefect.states import Cancelled, State
from pydantic import BaseModel

from data.atomic import symlink_atomic, write_bytes_atomic
from data.errors import ImagenetError
from data.proto import caffe_pb2
from tasks.cache import canonical_json, code_digest, file_digest, input_fingerprint, write_manifest
from tasks.eta import Schedule, TrainingClock, duration
from tasks.stage import PERCENT, ProgressArtifact, RecordedKey, StageResult, fail_in_one_line

TRAINING_DIR = "training"
TRAIN_CODE = ("model",)
SOLVER_FILE = "solver.prototxt"
NET_FILE = "train_val.prototxt"
SNAPSHOT_NAME = "snap"
CAFFEMODEL_EXT = ".caffemodel"
SOLVERSTATE_EXT = ".solverstate"
TRAIN_RETRIES = 2
TRAIN_RETRY_DELAY_S = 2
# Tests (and chaos drills) set this to an iteration: the segment that reaches it fails once.
INJECT_FAILURE_ENV = "IMAGENET_INJECT_TRAIN_FAILURE"
TOP5 = 5
TOP5_SUFFIX = "_top5"
# Training losses kept per segment for the summary's curve (the metrics file has them all).
LOSS_POINTS_PER_SEGMENT = 50
# force: [train] moves the configuration's earlier snapshots here (inside its run dir), named by
# the UTC time of the move, and trains from iteration 0.
PREVIOUS_DIR = "previous-{stamp}"
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# <data root>/training/<this name> links to the final weights of the newest training.
LATEST_WEIGHTS = "latest.caffemodel"
# The evaluate stage's `why` when the val LMDB was rebuilt in the same run.
WHY_VAL_REBUILT = "val LMDB rebuilt in this run"
# The estimate of the whole training is logged when first known, then at most this often.
ETA_LOG_INTERVAL_S = 600
_SNAP_RE = re.compile(r"_iter_(\d+)\.solverstate$")
REPO_ROOT = Path(__file__).resolve().parent.parent


class InjectedFailure(RuntimeError):
    """Raised once by a training segment when INJECT_FAILURE_ENV asks for it."""


class TrainingPlan(BaseModel):
    """Where one training configuration lives and how it is cut into segments."""

    run_dir: str
    solver: str
    net: str
    snapshot_prefix: str
    max_iter: int
    segment_ends: list[int]
    config_id: str
    test_batch_size: int
    accuracy_top_k: dict[str, int]
    # Where the net's ImageData layers read ({split: [listing, image folder]}); empty for nets
    # that read only the LMDBs. These are then inputs of the training and evaluation stages.
    image_inputs: dict[str, list[str]] = {}
    # The inference bundle beside the snapshots (model/bundle.py), or why there is none, and
    # what it could not record.
    bundle: str | None = None
    bundle_notes: list[str] = []
    # The .caffemodel training starts from (caffe train --weights: finetuning), or None.
    weights: str | None = None


def _resolve(path: str, relative_to: Path) -> Path:
    """Caffe resolves prototxt paths against the working directory; users also write them
    relative to the solver or the repository. Accept the first that exists."""
    p = Path(path)
    if p.is_absolute():
        return p
    for base in (Path.cwd(), relative_to, REPO_ROOT):
        if (base / p).exists():
            return (base / p).resolve()
    raise ImagenetError(f"{path}: not found (relative to {Path.cwd()}, {relative_to} or {REPO_ROOT})")


def _read(path: Path, message: Any) -> Any:
    try:
        text_format.Parse(path.read_text(), message)
    except text_format.ParseError as err:
        raise ImagenetError(f"{path}: {err}") from err
    return message


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic, and untouched when identical, so a rerun sees the same file."""
    if path.exists() and path.read_text() == text:
        return
    write_bytes_atomic(path, text.encode(), durable=False)


def _phase_of(layer: caffe_pb2.LayerParameter) -> int | None:
    for rule in layer.include:
        if rule.HasField("phase"):
            return rule.phase
    return None


def _ensure_top5(net: caffe_pb2.NetParameter) -> None:
    """The pipeline reports top-1 and top-5. A net with only a top-1 Accuracy layer in TEST
    (bvlc_alexnet's train_val.prototxt, say) gets a top-5 twin, as bvlc_googlenet has
    ("loss3/top-5"): the same bottoms with accuracy_param { top_k: 5 }."""
    accuracy = [l for l in net.layer if l.type == "Accuracy" and _phase_of(l) in (None, caffe_pb2.TEST)]
    if not accuracy or any(l.accuracy_param.top_k == TOP5 for l in accuracy):
        return
    # Caffe's AccuracyLayer requires top_k <= the number of classes: skip for tiny nets.
    producers = {top: l for l in net.layer for top in l.top}
    scores = producers.get(accuracy[0].bottom[0])
    classes = scores.inner_product_param.num_output if scores is not None else 0
    if classes < TOP5:
        return
    twin = net.layer.add()
    twin.CopyFrom(accuracy[0])
    twin.name = accuracy[0].name + TOP5_SUFFIX
    del twin.top[:]
    twin.top.append(accuracy[0].top[0] + TOP5_SUFFIX)
    twin.accuracy_param.top_k = TOP5


# Where a portable net (the configuration id's) says the data root is.
DATA_ROOT_MARK = "$DATA_ROOT"


def _portable_net(net: caffe_pb2.NetParameter, data_root: Path | str) -> caffe_pb2.NetParameter:
    """A copy of `net` whose data paths (Data and ImageData sources, ImageData root folders,
    mean files) under `data_root` are written relative to it."""
    root = Path(data_root).resolve()

    def portable(path: str) -> str:
        p = Path(path)
        return (f"{DATA_ROOT_MARK}/{p.relative_to(root).as_posix()}" if p.is_relative_to(root)
                else path)

    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    for layer in out.layer:
        for param, field in ((layer.data_param, "source"), (layer.image_data_param, "source"),
                             (layer.image_data_param, "root_folder"),
                             (layer.transform_param, "mean_file")):
            if param.HasField(field):
                setattr(param, field, portable(getattr(param, field)))
    return out


def check_solver_file(solver_src: str, max_iter: int | None = None) -> None:
    """What prepare_training would refuse in the solver and its net (a missing file, a syntax
    error, a negative base_lr), checked when the run starts instead of after the downloads and
    the conversion. Reads only."""
    from model.solver import check_solver, solver_type

    solver_path = _resolve(solver_src, REPO_ROOT)
    solver = _read(solver_path, caffe_pb2.SolverParameter())
    if not solver.net:
        raise ImagenetError(f"{solver_path}: the pipeline needs a solver with `net:` "
                            "(one train_val prototxt with TRAIN and TEST Data layers)")
    _read(_resolve(solver.net, solver_path.parent), caffe_pb2.NetParameter())
    if max_iter is not None:
        solver.max_iter = max_iter
    check_solver(solver, solver_type(solver), str(solver_path))


def prepare_training(
    data_root: Path | str,
    solver_src: str,
    *,
    train_lmdb: Path | str,
    val_lmdb: Path | str,
    mean_file: Path | str,
    max_iter: int | None = None,
    snapshot_interval: int | None = None,
    image_listings: Mapping[str, tuple[Path | str, Path | str]] | None = None,
    processes: int = 1,
    devices: Sequence[int] | None = None,
    weights: Path | str | None = None,
    resize_mode: str = "squash",
) -> TrainingPlan:
    """Write this data root's copies of the solver and net and cut max_iter into segments.

    Data layers are pointed at the LMDBs; ImageData layers (a net that reads images from a
    listing) at `image_listings` {"train"|"val": (listing, image folder)}, the listings and
    extracted trees of this data root. Either kind's mean_file becomes this root's mean.
    `processes` > 1 (local training processes, one device each on a CPU host) and `devices`
    (ids per process; default one device, as `caffe train` without --gpu) multiply the global
    batch, so both are part of the configuration id: a rerun on another count trains anew
    instead of resuming the other's snapshots; so are `weights`, the .caffemodel a finetuning
    starts from. `resize_mode`: how the LMDBs' images were resized, for the inference bundle."""
    if weights and not Path(weights).is_file():
        raise ImagenetError(f"weights {weights}: no such file (the .caffemodel to finetune "
                            "from)")
    solver_path = _resolve(solver_src, REPO_ROOT)
    solver = _read(solver_path, caffe_pb2.SolverParameter())
    if not solver.net:
        raise ImagenetError(f"{solver_path}: the pipeline needs a solver with `net:` "
                            "(one train_val prototxt with TRAIN and TEST Data layers)")
    net_path = _resolve(solver.net, solver_path.parent)
    net = _read(net_path, caffe_pb2.NetParameter())

    _ensure_top5(net)
    top_k: dict[str, int] = {}
    test_batch = 0
    image_inputs: dict[str, list[str]] = {}
    for layer in net.layer:
        phase = _phase_of(layer)
        split = "train" if phase == caffe_pb2.TRAIN else "val"
        if layer.type == "Data":
            layer.data_param.source = str(Path(train_lmdb if phase == caffe_pb2.TRAIN else val_lmdb).resolve())
            layer.data_param.backend = caffe_pb2.DataParameter.LMDB
            if phase == caffe_pb2.TEST:
                test_batch = layer.data_param.batch_size
        elif layer.type == "ImageData":
            if not image_listings or split not in image_listings:
                raise ImagenetError(f"{net_path}: layer {layer.name!r} (ImageData) reads images, "
                                    f"but no {split} listing and image folder were given")
            listfile, folder = (Path(x).resolve() for x in image_listings[split])
            layer.image_data_param.source = str(listfile)
            layer.image_data_param.root_folder = str(folder) + "/"
            image_inputs[split] = [str(listfile), str(folder)]
            if phase == caffe_pb2.TEST:
                test_batch = layer.image_data_param.batch_size
        if layer.type in ("Data", "ImageData") and layer.transform_param.HasField("mean_file"):
            layer.transform_param.mean_file = str(Path(mean_file).resolve())
        if layer.type == "Accuracy" and phase in (None, caffe_pb2.TEST):
            for top in layer.top:
                top_k[top] = layer.accuracy_param.top_k or 1
    if not test_batch:
        raise ImagenetError(f"{net_path}: no TEST-phase Data or ImageData layer with a "
                            "batch_size: the pipeline evaluates on the val set through it")

    if max_iter is not None:
        solver.max_iter = max_iter
    interval = snapshot_interval or solver.snapshot or solver.max_iter
    if interval <= 0 or solver.max_iter <= 0:
        raise ImagenetError(f"{solver_path}: max_iter ({solver.max_iter}) and the snapshot "
                            f"interval ({interval}) must be positive")
    solver.snapshot = interval
    solver.snapshot_after_train = True

    # The configuration id covers everything the weights depend on, and no path: a copied or
    # moved data root finds its snapshots (the data by the digests below, the net with its data
    # paths relative to the data root, the solver without the paths this function sets).
    config_solver = caffe_pb2.SolverParameter()
    config_solver.CopyFrom(solver)
    config_solver.ClearField("net")
    config_solver.ClearField("snapshot_prefix")
    config = {
        "solver": text_format.MessageToString(config_solver),
        "net": text_format.MessageToString(_portable_net(net, data_root)),
        "data": {name: input_fingerprint(p) for name, p in
                 (("train", train_lmdb), ("val", val_lmdb), ("mean", mean_file),
                  *((f"{split}_{i}", x) for split, xs in image_inputs.items()
                    for i, x in enumerate(xs)))},
        "code": code_digest(TRAIN_CODE),
        # absent for one process: the ids of single-process configurations stay as they were
        **({"processes": processes} if processes > 1 else {}),
        **({"devices": len(devices)} if devices and len(devices) > 1 else {}),
        # absent from scratch, likewise: finetuning from other weights is another configuration
        **({"weights": input_fingerprint(weights)} if weights else {}),
    }
    import hashlib

    config_id = hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]
    run_dir = Path(data_root) / TRAINING_DIR / f"{net_path.parent.name}-{config_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    prefix = run_dir / SNAPSHOT_NAME
    solver.net = str(run_dir / NET_FILE)
    solver.snapshot_prefix = str(prefix)
    _write_if_changed(run_dir / NET_FILE, text_format.MessageToString(net))
    _write_if_changed(run_dir / SOLVER_FILE, text_format.MessageToString(solver))

    bundle, notes = _write_bundle(prefix, net, run_dir / NET_FILE, resize_mode)

    ends = list(range(interval, solver.max_iter, interval)) + [solver.max_iter]
    return TrainingPlan(run_dir=str(run_dir), solver=str(run_dir / SOLVER_FILE),
                        net=str(run_dir / NET_FILE), snapshot_prefix=str(prefix),
                        max_iter=solver.max_iter, segment_ends=ends, config_id=config_id,
                        test_batch_size=test_batch, accuracy_top_k=top_k,
                        image_inputs=image_inputs, bundle=bundle, bundle_notes=notes,
                        weights=str(Path(weights).resolve()) if weights else None)


def _write_bundle(prefix: Path, net: caffe_pb2.NetParameter, net_file: Path,
                  resize_mode: str = "squash") -> tuple[str | None, list[str]]:
    """The inference bundle of this configuration's snapshots (model/bundle.py): the class
    names are the data root's (labels.txt, else synset_words.txt, beside the LMDBs' folder).
    Written before the first snapshot, so every snapshot on disk has one; a net the bundle
    cannot describe still trains (the note says why)."""
    from model.bundle import write_bundle

    try:
        path, notes = write_bundle(prefix, net, net_source=str(net_file),
                                   resize_mode=resize_mode)
    except ImagenetError as err:
        return None, [f"no inference bundle for classify: {err}"]
    return str(path), notes


def link_latest(data_root: Path | str, weights: Path | str) -> Path:
    """<data root>/training/latest.caffemodel -> these final weights (a relative symbolic link,
    replaced atomically): `imagenet classify --weights=<data root>/training/latest.caffemodel`
    answers with the newest model the pipeline trained (its bundle is found through the link)."""
    link = Path(data_root) / TRAINING_DIR / LATEST_WEIGHTS
    target = os.path.relpath(Path(weights).resolve(), link.parent.resolve())
    if link.is_symlink() and os.readlink(link) == target:
        return link
    symlink_atomic(link, target)
    return link


def snapshot_files(prefix: str, it: int) -> tuple[Path, Path]:
    """Caffe's names: <prefix>_iter_<N>.caffemodel / .solverstate."""
    return (Path(f"{prefix}_iter_{it}{CAFFEMODEL_EXT}"), Path(f"{prefix}_iter_{it}{SOLVERSTATE_EXT}"))


def newest_snapshot(prefix: str, at_most: int) -> int | None:
    """The highest iteration <= at_most with both snapshot files on disk."""
    folder, stem = Path(prefix).parent, Path(prefix).name
    best = None
    for path in folder.glob(f"{stem}_iter_*{SOLVERSTATE_EXT}"):
        m = _SNAP_RE.search(path.name)
        if not m:
            continue
        it = int(m.group(1))
        if it <= at_most and snapshot_files(prefix, it)[0].exists() and (best is None or it > best):
            best = it
    return best


def read_schedule(solver: str | Path) -> Schedule:
    """The work a solver describes (tasks.eta): iterations, test passes and batch sizes."""
    sp = _read(Path(solver), caffe_pb2.SolverParameter())
    net = _read(_resolve(sp.net, Path(solver).parent), caffe_pb2.NetParameter())
    batch = {phase: 0 for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST)}
    for layer in net.layer:
        phase = _phase_of(layer)
        if layer.type == "Data" and phase in batch:
            batch[phase] = layer.data_param.batch_size
    return Schedule(max_iter=sp.max_iter, test_interval=sp.test_interval,
                    test_batches=sum(sp.test_iter), test_initialization=sp.test_initialization,
                    train_images_per_iter=batch[caffe_pb2.TRAIN] * max(sp.iter_size, 1),
                    test_batch_size=batch[caffe_pb2.TEST])


def move_snapshots_aside(snapshot_prefix: str) -> tuple[Path, int]:
    """Move every file of this snapshot prefix (snapshots, their side files and manifests, the
    metrics and plot) into previous-<UTC time>/ beside them; (folder, files moved)."""
    prefix = Path(snapshot_prefix)
    files = sorted(p for p in prefix.parent.glob(prefix.name + "_*") if p.is_file())
    stamp = datetime.now(timezone.utc).strftime(STAMP_FORMAT)
    folder = prefix.parent / PREVIOUS_DIR.format(stamp=stamp)
    if files:
        folder.mkdir(exist_ok=True)
        for path in files:
            os.replace(path, folder / path.name)
    return folder, len(files)


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a training segment on anything but a user error (a bad prototxt stays bad)."""
    try:
        state.result()
    except ImagenetError:
        return False
    except Exception:
        return True
    return False


def _injected_failure_hook(run_dir: Path, start: int, end: int):
    """If INJECT_FAILURE_ENV names an iteration inside this segment, fail once when reaching it."""
    raw = os.environ.get(INJECT_FAILURE_ENV)
    if not raw:
        return None
    at = int(raw)
    marker = run_dir / f"injected-failure-{at}.done"
    if not (start < at <= end) or marker.exists():
        return None

    def hook(it: int) -> None:
        if it >= at:
            marker.write_text(str(it))
            raise InjectedFailure(f"injected failure at iteration {it} ({INJECT_FAILURE_ENV}={at})")

    return hook


@task(cache_policy=RecordedKey(), retries=TRAIN_RETRIES, retry_delay_seconds=TRAIN_RETRY_DELAY_S,
      retry_condition_fn=retry_unless_user_error)
@fail_in_one_line
def train_segment(
    cache_key: str,
    solver: str,
    snapshot_prefix: str,
    start_iter: int,
    end_iter: int,
    max_iter: int,
    devices: list[int] | None = None,
    restart: bool = False,
    processes: int = 1,
    workers: int | None = None,
    weights: str | None = None,
) -> StageResult | State:
    """Train from the newest snapshot <= end_iter (normally start_iter's) to end_iter.

    `weights` (a .caffemodel): where there is no snapshot to resume, start from these weights
    by layer name (`caffe train --weights`); the log says which layers were copied and which
    start from their fillers.

    `restart` (force: [train], first segment): move this configuration's earlier snapshots
    aside first, so training starts again from iteration 0. `workers`: input decoding threads
    per process (None: one per core; not part of the cache key: the data do not depend on
    it). `processes` > 1: that many local
    training processes joined by jax.distributed (model/distributed.py); process 0's log,
    progress and test outputs come here as from one process. SIGTERM (a cancelled flow run) or
    SIGINT: model.train snapshots and stops, and the task run ends Cancelled, saying where (the
    flow then ends Cancelled too). Prefect's own SIGTERM bridge cannot do this while training
    runs in this process: it would interrupt a step or a snapshot anywhere, and it acknowledges
    a cancellation only while it is the installed handler, which model.train's is then."""
    from model.distributed import run_local_processes
    from model.train import train

    log = get_run_logger()
    run_dir = Path(solver).parent
    if restart:
        folder, moved = move_snapshots_aside(snapshot_prefix)
        log.info("force train: moved %d files of this configuration's earlier training to %s; "
                 "training from iteration 0", moved, folder)
    resume = newest_snapshot(snapshot_prefix, end_iter)
    caffemodel, solverstate = snapshot_files(snapshot_prefix, end_iter)
    rows: list[dict[str, Any]] = []
    loss_rows: list[dict[str, Any]] = []
    seconds, images_per_second = 0.0, 0.0
    if resume == end_iter:
        log.info("snapshot at iteration %d already on disk (an earlier run got this far)", end_iter)
    else:
        if resume is None and start_iter > 0:
            log.warning("no snapshot <= %d on disk: training this configuration from 0", end_iter)
        elif resume is not None and resume < start_iter:
            log.warning("newest snapshot on disk is iteration %d, before this segment's start %d",
                        resume, start_iter)
        snapshot = str(snapshot_files(snapshot_prefix, resume)[1]) if resume else None
        finetune = weights if snapshot is None else None
        log.info("training iterations %d -> %d%s", resume or 0, end_iter,
                 f" (resuming from {snapshot})" if snapshot else
                 f" (finetuning from {finetune})" if finetune else " (from scratch)")
        if finetune:
            for line in finetune_report(solver, finetune):
                log.info("%s", line)
        clock = TrainingClock(read_schedule(solver), resume or 0, end_iter)
        progress = ProgressArtifact(f"training iterations {resume or 0}->{end_iter} of {max_iter}",
                                    unit="iterations")
        inject = _injected_failure_hook(run_dir, resume or 0, end_iter)
        logged_eta = [-math.inf]

        def show() -> None:
            """The artifact's bar covers this segment (it ends at 100%), its text says the rate
            and the time left; the whole training's estimate also goes to the log, once known
            and then every ETA_LOG_INTERVAL_S."""
            progress.describe(clock.describe())
            progress(clock.iteration - clock.start, clock.end - clock.start)
            total = clock.seconds_left(max_iter)
            now = time.monotonic()
            if total is not None and now - logged_eta[0] >= ETA_LOG_INTERVAL_S:
                logged_eta[0] = now
                _, measured = clock.seconds_per_iteration
                log.info("training time left: %s to iteration %d (%s)", duration(total), max_iter,
                         "measured" if measured else "estimated from the test speed: a training "
                         "image costs about 3 forward passes")

        def on_progress(it: int, total: int) -> None:
            clock.on_iteration(it)
            show()
            if inject is not None:
                inject(it)

        def on_test_batch(it: int, batch: int, of: int) -> None:
            clock.on_test_batch(it, batch, of)
            show()

        def on_test(it: int, outputs: dict[str, Any]) -> None:
            rows.append({"iter": int(it), **{k: float(v) for k, v in outputs.items()}})
            log.info("test at iteration %d: %s", it,
                     ", ".join(f"{k} = {float(v):.4g}" for k, v in outputs.items()))

        options = dict(snapshot=snapshot, devices=devices, stop_at_iter=end_iter, workers=workers,
                       **({"weights": finetune} if finetune else {}),
                       on_progress=on_progress, on_test=on_test, workdir=str(run_dir),
                       log=lambda line: log.info("%s", line))
        if processes > 1:
            log.info("training in %d local processes (jax.distributed over 127.0.0.1)",
                     processes)
            result = run_local_processes(processes, solver, **options)
        else:
            result = train(solver, on_test_batch=on_test_batch, **options)
        if result.stopped_by is not None:
            where = result.last_snapshot[1] if result.last_snapshot else "no snapshot"
            message = (f"stopped by {result.stopped_by} at iteration {result.final_iter} "
                       f"after the snapshot ({where}); a rerun resumes there")
            log.warning("%s", message)
            progress.finish(f"stopped at iteration {result.final_iter} of {max_iter}",
                            percent=PERCENT * (result.final_iter - clock.start)
                            / max(clock.end - clock.start, 1))
            return Cancelled(message=message)
        losses = sorted(result.losses.items())
        step = max(1, len(losses) // LOSS_POINTS_PER_SEGMENT)
        loss_rows = [{"iter": int(i), "train loss": float(v)} for i, v in losses[::step]]
        seconds = float(result.seconds)
        images_per_second = float(result.images_per_second or 0.0)
        if newest_snapshot(snapshot_prefix, end_iter) != end_iter:
            raise RuntimeError(f"training stopped at {result.final_iter} without writing "
                               f"{solverstate} (solver snapshot settings?)")
        rate = clock.iterations_per_second
        progress.finish(f"iterations {clock.start}->{end_iter} of {max_iter} done in "
                        f"{duration(seconds)}" + (f" ({rate:.3g} iterations/s)" if rate else ""))
    for path in (caffemodel, solverstate):
        digest = file_digest(path)
        write_manifest(path, stage="train", key=cache_key, digest=digest,
                       record={"iter": end_iter}, content=f"sha256:{digest}")
    metrics = Path(snapshot_prefix).parent
    return StageResult(
        stage="train", key=cache_key,
        outputs={"caffemodel": str(caffemodel), "solverstate": str(solverstate),
                 "run_dir": str(metrics)},
        record={"start_iter": start_iter, "end_iter": end_iter, "resumed_from": resume,
                "tests": rows, "losses": loss_rows, "images_per_second": images_per_second},
        seconds=seconds, throughput=f"{images_per_second:.1f} img/s" if images_per_second else "",
    )


def finetune_report(solver: str, weights: str) -> list[str]:
    """What `caffe train --weights` will do with the train net's learnable layers, by name:
    copied from `weights`, left to their fillers, and the source's layers the net lacks."""
    from model.caffemodel import read_net_binary
    from model.net import Net

    sp = _read(Path(solver), caffe_pb2.SolverParameter())
    net = Net.from_prototxt(_resolve(sp.net, Path(solver).parent), "TRAIN")
    source = {layer.name for layer in read_net_binary(weights).layer if layer.blobs}
    learnable = [layer.name for layer in net.layers if layer.blobs]
    copied = [n for n in learnable if n in source]
    fresh = [n for n in learnable if n not in source]
    ignored = sorted(source - set(learnable))
    def layers(names: list[str]) -> str:
        return f"{len(names)} layer{'s' if len(names) != 1 else ''}" + (
            f" ({', '.join(names)})" if names else "")

    lines = [f"copied by name from the weights: {layers(copied)}",
             f"not in the weights, starting from their fillers: {layers(fresh)}"]
    if ignored:
        lines.append(f"in the weights but not in the net, ignored: {layers(ignored)}")
    if not copied:
        lines.append("no layer of the weights matches the net by name: this is training from "
                     "scratch (wrong --weights file?)")
    return lines


def eval_path(plan: TrainingPlan, it: int) -> Path:
    return Path(plan.run_dir) / f"eval_iter_{it}.json"


@task(cache_policy=RecordedKey())
@fail_in_one_line
def evaluate_weights(
    cache_key: str,
    net: str,
    weights: str,
    iterations: int,
    output: str,
    accuracy_top_k: dict[str, int],
    devices: list[int] | None = None,
) -> StageResult:
    """Score the final weights on the val LMDB (the net's TEST phase): top-1 and top-5."""
    from model.train import evaluate

    log = get_run_logger()
    start = time.monotonic()
    progress = ProgressArtifact(f"evaluate {Path(weights).name} on the val LMDB "
                                f"({iterations} batches)", unit="batches")
    outputs = {k: float(v) for k, v in
               evaluate(net, weights, iterations, devices=devices, on_batch=progress).items()}
    seconds = time.monotonic() - start
    progress.finish()
    by_k = {k: outputs[name] for name, k in accuracy_top_k.items() if name in outputs}
    record = {"outputs": outputs, "top1": by_k.get(1), "top5": by_k.get(5),
              "iterations": iterations}
    out = Path(output)
    write_bytes_atomic(out, json.dumps(record, indent=1).encode(), durable=False)
    digest = file_digest(out)
    write_manifest(out, stage="evaluate", key=cache_key, digest=digest, content=f"sha256:{digest}")
    log.info("evaluation of %s over %d iterations: %s", weights, iterations,
             ", ".join(f"{k} = {v:.4g}" for k, v in outputs.items()))
    return StageResult(stage="evaluate", key=cache_key, outputs={"metrics": str(out)},
                       record=record, seconds=seconds)


def eval_iterations(val_count: int, test_batch_size: int) -> int:
    """Enough TEST batches to see every val image once (Caffe's test_iter * batch = 50,000)."""
    return max(1, math.ceil(val_count / test_batch_size))
