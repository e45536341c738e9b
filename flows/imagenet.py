"""The `imagenet` flow: Caffe's ImageNet workflow as one Prefect DAG.

[mini ILSVRC12] -> download (train, val, aux; concurrently) -> extract (train, val) -> listings
-> convert (train and val LMDBs) -> mean -> train (one task per snapshot interval) -> evaluate
-> summary.

The flow only wires tasks: for each stage it computes the cache key (tasks.cache.stage_key), asks
whether the stage's recorded outputs are intact, and calls the task with refresh_cache=True when
they are not or when the user forces the stage. Each task run is given the states of the task
runs it depends on (`wait_for`), so the run's graph in the Prefect UI draws the DAG's edges.

Its parameters sit at the top level (data_root, sources, resize_height, ..., stages, force), so
`prefect deployment run imagenet/convert-lmdb --param data_root=D` combines with the
deployment's presets; the flow checks them once into the typed `PipelineParams`, the same model
`imagenet pipeline` builds from flags. A stage that cannot run (a missing input, a bad prototxt)
ends the flow run Failed with one line, "stage NAME: cause", as its state message; the traceback
goes to the DEBUG log only, and no folder is created for a stage that never ran.
"""
from __future__ import annotations

import logging
import signal
import time
import uuid
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import TerminationSignal
from prefect.logging import get_run_logger
from prefect.states import Cancelled, Failed, State
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from data import image_folder
from data.errors import ImagenetError
from data.ilsvrc12 import SYNSETS_FILE, TRAIN_LIST, VAL_LIST
from flows.cancel import keep_message_hook
from flows.commands.pipeline import DEFAULT_DATA_ROOT, describe_validation_error
from model.zoo import recipes
from tasks import acquire, convert, folder, logs, report
from tasks import train as training
from tasks.accelerator import accelerator_slot
from tasks.cache import read_manifest, stage_key, stale_reason
from tasks.stage import (RESULTS_DIRNAME, USER_ERRORS, StageCancelled, StageFailed, StageGroup,
                         StageRun, call_stage, one_line)

logs.install()  # tracebacks at DEBUG, one line at ERROR (tasks/logs.py)

Stage = Literal["download", "extract", "listings", "convert", "mean", "train", "evaluate"]
# data.images.RESIZE_MODES and model.zoo.recipes.RECIPES as types, so the Prefect UI offers them
# as choices (tests/flows check they agree).
ResizeMode = Literal["squash", "crop", "fill", "half_crop"]
NetName = Literal["alexnet_mini", "bvlc_alexnet", "bvlc_reference_caffenet", "bvlc_googlenet",
                  "resnet_50"]
STAGES: tuple[str, ...] = ("download", "extract", "listings", "convert", "mean", "train", "evaluate")
ARCHIVES = ("train", "val", "aux")
# Stages that run on the accelerator: a run holds the host's slot from the first one on.
ACCELERATOR_STAGES = ("train", "evaluate")
# Public locations: ImageNet's (login needed: put the files there yourself, or give URLs of a
# mirror) and Caffe's aux tarball as data/ilsvrc12/get_ilsvrc_aux.sh fetches it.
DEFAULT_TRAIN_URL = "https://image-net.org/data/ILSVRC/2012/ILSVRC2012_img_train.tar"
DEFAULT_VAL_URL = "https://image-net.org/data/ILSVRC/2012/ILSVRC2012_img_val.tar"
DEFAULT_AUX_URL = "http://dl.caffe.berkeleyvision.org/caffe_ilsvrc12.tar.gz"
DEFAULT_SOLVER = "model/zoo/bvlc_alexnet/solver.prototxt"
DEFAULT_NET = "bvlc_alexnet"  # DEFAULT_SOLVER's recipe: what your own images train without net
DEFAULT_RESIZE = 256  # examples/imagenet/create_imagenet.sh
DEFAULT_SHUFFLE_SEED = 0
# Parameters are checked strictly, once (PipelineParams): JSON's true is no worker count and
# "5" no iteration count. Caffe keeps iterations and image sizes in int32 fields.
STRICT = ConfigDict(strict=True)
INT32_MAX = 2**31 - 1
# Conversion workers beyond this are a typo, not a plan: each holds images in flight, and a
# thread or process pool of millions exhausts memory before the first image.
MAX_WORKERS = 256


class Sources(BaseModel):
    """Where each archive comes from: an http(s)/file URL, a local path (used in place), or
    `mini` / `mini:tiny` for the built-in mini ILSVRC12, built under the data root."""

    model_config = STRICT

    train: str = Field(DEFAULT_TRAIN_URL, min_length=1, description="ILSVRC2012_img_train.tar")
    val: str = Field(DEFAULT_VAL_URL, min_length=1, description="ILSVRC2012_img_val.tar")
    aux: str = Field(DEFAULT_AUX_URL, min_length=1,
                     description="Caffe's caffe_ilsvrc12.tar.gz (listings)")
    checksums: str | None = Field(
        None, description="md5sum-format file (URL or path) for archives that are not the "
        "official ones; the official ones are checked against their known md5s (the mini's "
        "MD5SUMS is used for `mini` sources)")


class PipelineParams(BaseModel):
    """Everything a run of the `imagenet` flow depends on: exactly the flow's parameters,
    each checked here by type (strictly: no bool for a number, no string for a list) and range,
    so a bad value is one line before anything runs."""

    model_config = STRICT

    data_root: str = Field(DEFAULT_DATA_ROOT, min_length=1, description="where archives, images, LMDBs, "
                           "snapshots and the stage cache live")
    sources: Sources = Field(default_factory=Sources, description="where the three archives come "
                             "from (URL, path, or `mini` for the built-in mini ILSVRC12)")
    images: str | None = Field(None, min_length=1, description="your own images instead of ILSVRC12: a "
                               "folder with one subfolder per class (any depth below it), or "
                               "train/ and val/ folders of class folders; no download or "
                               "extract stage then")
    val_percent: float | None = Field(None, gt=0, lt=100, description="with images: the share "
                                      "of each class held out for validation (default "
                                      f"{image_folder.DEFAULT_VAL_PERCENT}; the split is seeded "
                                      "by shuffle_seed)")
    resize_height: int | None = Field(None, ge=0, le=INT32_MAX, description="convert_imageset "
                                      "--resize_height (0: keep; default: what the data root's "
                                      f"LMDBs were built with, else {DEFAULT_RESIZE}, or the net's "
                                      "record size: 64 for alexnet_mini)")
    resize_width: int | None = Field(None, ge=0, le=INT32_MAX, description="convert_imageset "
                                     "--resize_width (0: keep; default: what the data root's "
                                     f"LMDBs were built with, else {DEFAULT_RESIZE}, or the "
                                     "net's)")
    resize_mode: ResizeMode | None = Field(None, description="how images reach that size: "
                                           "squash (Caffe's: aspect ratio ignored), crop, fill "
                                           "or half_crop (NVIDIA DIGITS's modes); default: "
                                           "what the data root's LMDBs were built with, else "
                                           "squash")
    encoded: bool | None = Field(None, description="convert_imageset --encoded: store JPEG "
                                 "bytes (default: what the data root's LMDBs were built with, "
                                 "else false)")
    shuffle_seed: int | None = Field(DEFAULT_SHUFFLE_SEED, description="shuffle the listings "
                                     "with this seed (reproducible, unlike Caffe's --shuffle); "
                                     "null: keep order")
    solver: str = Field(DEFAULT_SOLVER, min_length=1, description="solver.prototxt (its `net:` is the "
                        "train_val prototxt; its Data layers are pointed at this run's LMDBs)")
    net: NetName | None = Field(None, description="a zoo net and its solver (instead of "
                               "solver), its classifier layers sized to the dataset's classes "
                               f"(with images and no solver: {DEFAULT_NET})")
    weights: str | None = Field(None, min_length=1, description="finetune: start training from this "
                                ".caffemodel, layers copied by name (caffe train --weights)")
    finetune_lr_factor: float = Field(recipes.FINETUNE_LR_FACTOR, gt=0, allow_inf_nan=False,
                                      description="with net "
                                      "and weights: base_lr / this, the new classifier layers' "
                                      "lr_mult x this (Caffe's flickr_style example: 10; 1 "
                                      "keeps the recipe's rates)")
    max_iter: int | None = Field(None, gt=0, le=INT32_MAX, description="override the solver's max_iter")
    snapshot_interval: int | None = Field(None, gt=0, le=INT32_MAX, description="training segment length "
                                          "(default: the solver's snapshot)")
    devices: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="device ids to train on, data-parallel (default: one, the solver's "
        "device_id, as Caffe without --gpu)")
    processes: int = Field(1, ge=1, description="training processes on this host, joined by "
                           "jax.distributed (global batch = batch_size x devices of all)")
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES),
                                description="which stages to run (others use what is on disk)")
    force: list[Stage] = Field(default_factory=list, description="stages to recompute even "
                               "when cached (force: [train] trains again from iteration 0)")
    workers: int = Field(0, ge=0, le=MAX_WORKERS, description="conversion workers and "
                         "training's input threads per process (0: one per core)")

    @field_validator("stages", "force")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return sorted(set(value), key=STAGES.index)

    @model_validator(mode="after")
    def _choices_agree(self) -> "PipelineParams":
        if self.net and self.solver != DEFAULT_SOLVER:
            raise ValueError(f"give net ({self.net}) or solver ({self.solver}), not both: net "
                             "picks a zoo solver")
        if self.val_percent is not None and not self.images:
            raise ValueError("val_percent splits the images folder: give images too")
        return self

    def zoo_net(self) -> str | None:
        """The zoo recipe this run trains: `net`, or with your own images and neither net nor
        solver given, the default solver's net (bvlc_alexnet) sized to their classes; None
        when the run trains the user's solver as it is."""
        if self.net:
            return self.net
        return DEFAULT_NET if self.images and self.solver == DEFAULT_SOLVER else None

    @field_validator("devices")
    @classmethod
    def _distinct_devices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"a device is named twice in {value}")
        return value

    @field_validator("processes")
    @classmethod
    def _processes_fit_the_host(cls, value: int) -> int:
        from data.host import available_cores

        cores = available_cores()
        if value > cores:
            raise ValueError(f"{value} training processes on a host with {cores} cores: each "
                             f"needs one at least; use at most {cores}")
        return value

    @model_validator(mode="after")
    def _resize(self) -> "PipelineParams":
        from data.images import MAX_PIXELS_DEFAULT

        h, w = self.resize_height, self.resize_width
        if h is None or w is None:
            return self  # the other comes from the data root's LMDBs (_conversion)
        if (h == 0) != (w == 0):
            raise ValueError(f"resize_height={h} with resize_width={w}: give both sizes to "
                             "resize, or 0 for both to keep each image's size")
        if h * w > MAX_PIXELS_DEFAULT:
            raise ValueError(f"resize_height={h} x resize_width={w} = {h * w:,} pixels per "
                             f"image, over the limit of {MAX_PIXELS_DEFAULT:,}")
        return self

    def flow_parameters(self) -> dict[str, Any]:
        """Keyword arguments for `imagenet(...)` (the flow's parameters are these fields)."""
        return dict(self)


class _Runner:
    """Per-run bookkeeping: which stages were asked for and forced, what each did, and the
    final state of each stage's task run (what downstream stages wait for)."""

    def __init__(self, p: PipelineParams, root: Path) -> None:
        self.p, self.root = p, root
        self.runs: list[StageRun] = []
        self.states: dict[str, State] = {}
        self.stopped: list[tuple[str, str]] = []  # stages cancelled beside a failed one
        self.changes: list[str] = []  # what this run changed in the data root, said aloud
        self.current: str | None = None  # the stage being prepared or run
        self.failed_beside: list[tuple[str, str]] = []  # failures after the first, same group
        # What the data root held when the run started: a failed run removes the folders it
        # created and left empty (tidy_after_failure).
        self.existed = root.exists()
        self.folders = ({c.name for c in root.iterdir() if c.is_dir()} if root.is_dir()
                        else set())
        self.started = time.time()
        # This host's accelerator slot, taken by the first stage that needs the accelerator
        # and kept until the flow run ends (tasks/accelerator.py says why).
        self.held = ExitStack()
        self.holding = False

    def tidy_after_failure(self) -> None:
        """A failed stage creates no folders: remove the folders this run created under the
        data root that hold nothing (Prefect's failure records, named by a uuid and never
        read as a cache, do not count), and the data root itself when this run made it."""
        root = self.root
        if not root.is_dir():
            return
        for child in root.iterdir():
            if not child.is_dir() or child.name in self.folders:
                continue
            if child.name == RESULTS_DIRNAME:
                for record in child.iterdir():
                    if _is_uuid(record.name) and record.stat().st_mtime >= self.started - 1:
                        record.unlink(missing_ok=True)
            with suppress(OSError):
                child.rmdir()  # only when empty
        if not self.existed:
            with suppress(OSError):
                root.rmdir()

    def wanted(self, stage: str) -> bool:
        return stage in self.p.stages

    def forced(self, stage: str) -> bool:
        return stage in self.p.force

    def after(self, *names: str) -> list[State | None]:
        """The states of these task runs, where they ran (or came from the cache) in this run."""
        return [self.states.get(name) for name in names]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Failures while preparing or running stage `name` become StageFailed (one line)."""
        self.current = name
        try:
            yield
        except StageFailed:
            raise
        except USER_ERRORS as err:
            raise StageFailed(name, one_line(err)) from err

    def record(self, run: StageRun) -> StageRun:
        self.runs.append(run)
        if run.state is not None:
            self.states[run.name] = run.state
        return run

    def call(self, stage: str, task: Any, name: str, *, key: str, outputs: list[Path],
             force: bool | str = False, **kwargs: Any) -> StageRun:
        if stage in ACCELERATOR_STAGES and not self.holding:
            self.holding = True
            self.held.enter_context(accelerator_slot(get_run_logger(), name))
        with self.stage(name):
            return self.record(call_stage(
                task, name, results_root=self.root, cache_key=key, outputs=outputs,
                force=force or self.forced(stage), **kwargs))


# A deployment run's parameters are checked by the Prefect API against this flow's JSON schema
# (enforce_parameter_schema: true is no integer there either), `imagenet pipeline`'s by
# PipelineParams before the call; the first line of the flow checks them all again.
@flow(name="imagenet", log_prints=True, persist_result=False,
      on_cancellation=[keep_message_hook])
def imagenet(
    data_root: str = DEFAULT_DATA_ROOT,
    sources: Sources = Sources(),
    images: str | None = None,
    val_percent: float | None = None,
    resize_height: int | None = None,
    resize_width: int | None = None,
    resize_mode: ResizeMode | None = None,
    encoded: bool | None = None,
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    solver: str = DEFAULT_SOLVER,
    net: NetName | None = None,
    weights: str | None = None,
    finetune_lr_factor: float = recipes.FINETUNE_LR_FACTOR,
    max_iter: int | None = None,
    snapshot_interval: int | None = None,
    devices: list[int] | None = None,
    processes: int = 1,
    stages: list[Stage] = list(STAGES),
    force: list[Stage] = [],
    workers: int = 0,
) -> dict[str, Any] | State:
    """Run Caffe's ImageNet workflow; every stage is cached and reruns only when needed.

    Args:
        data_root: where archives, images, LMDBs, snapshots and the stage cache live
        sources: where the three archives come from (URL, path, or `mini` / `mini:tiny` for
            the built-in mini ILSVRC12, built once under the data root)
        images: your own images instead of ILSVRC12: a folder of class folders (or of train/
            and val/ folders of class folders)
        val_percent: with images: the share of each class held out for validation (25)
        resize_height: convert_imageset --resize_height (0: keep; default: what the data
            root's LMDBs were built with, else 256, or the net's record size)
        resize_width: convert_imageset --resize_width (0: keep; default: as resize_height)
        resize_mode: squash (Caffe's), crop, fill or half_crop (DIGITS's resize modes;
            default: as the data root's LMDBs, else squash)
        encoded: convert_imageset --encoded: store JPEG bytes (default: as the data root's
            LMDBs, else false)
        shuffle_seed: shuffle the listings with this seed (reproducible); null: keep order
        solver: solver.prototxt; its Data layers are pointed at this run's LMDBs
        net: a zoo net and solver instead, sized to the dataset's class count
        weights: finetune from this .caffemodel (layers copied by name)
        finetune_lr_factor: with net and weights: base_lr / f, new layers' lr_mult x f
        max_iter: override the solver's max_iter
        snapshot_interval: training segment length (default: the solver's snapshot)
        devices: device ids to train on, data-parallel (default: one, the solver's
            device_id, as Caffe without --gpu)
        processes: training processes on this host, joined by jax.distributed
        stages: which stages to run (others use what is on disk)
        force: stages to recompute even when cached ([train]: train again from iteration 0)
        workers: conversion workers and training's input threads per process (0: one per core)
    """
    log = get_run_logger()
    try:
        # The parameters are exactly PipelineParams' fields (tests/flows checks the two agree).
        p = PipelineParams(**{name: value for name, value in locals().items()
                              if name in PipelineParams.model_fields})
    except ValidationError as err:
        return _refused(log, f"parameters: {describe_validation_error(err)}", err)
    refused = acquire.refuse_credentials(dict(p.sources))
    if refused:
        _scrub_sources(p)
        return _refused(log, f"parameters: {refused}", ValueError(refused))
    r = _Runner(p, Path(p.data_root).resolve())
    try:
        return _run_stages(r, log)
    except StageCancelled as err:
        return _cancelled(r, log, str(err), err.stage)
    except StageFailed as err:
        _stop_summary(r, log, "Failed", str(err), err.stage)
        r.tidy_after_failure()
        return _failed(log, str(err), err)
    except (TerminationSignal, KeyboardInterrupt) as err:  # cancelled between two stages
        name = signal.Signals(err.signal).name if isinstance(err, TerminationSignal) else "SIGINT"
        stage = r.current or "?"
        return _cancelled(r, log, f"stage {stage}: stopped by {name}; a rerun runs it again",
                          stage)
    finally:
        r.held.close()  # this host's accelerator slot, where the run took it


def _is_uuid(name: str) -> bool:
    try:
        uuid.UUID(name)
    except ValueError:
        return False
    return True


def _refused(log: logging.LoggerAdapter, message: str, err: BaseException) -> State:
    """Parameters that cannot run: Failed before any stage, with a summary saying so."""
    try:
        create_markdown_artifact(
            markdown=report.stopped_summary_markdown(
                [], state="Failed", message=message, stage=None, stopped=[], not_reached=[],
                data_root="(not used)", rerun="nothing ran; a run with corrected parameters "
                "runs the stages asked for"),
            key=report.ARTIFACT_KEY_SUMMARY, description="imagenet pipeline summary (Failed)")
    except Exception as exc:  # noqa: BLE001 - the state message says it all the same
        log.debug("could not write the summary artifact: %s", exc)
    return _failed(log, message, err)


def _cancelled(r: "_Runner", log: logging.LoggerAdapter, message: str, stage: str) -> State:
    """End the flow run Cancelled with `message` (the same whichever way it was cancelled:
    flows/services.py keeps it when Prefect's runner writes its own), after the summary."""
    log.warning("%s", message)
    _stop_summary(r, log, "Cancelled", message, stage)
    report.announce(message, {"message": message}, event=report.CANCELLED_EVENT)
    return Cancelled(message=message)


def _base_stage(name: str) -> str:
    """The `stages` entry a task run belongs to (download-train -> download, train-0-100 ->
    train, mini-ilsvrc12 -> download)."""
    if name == "mini-ilsvrc12":
        return "download"
    base = name.split("-", 1)[0]
    return base if base in STAGES else name


def _stop_summary(r: "_Runner", log: logging.LoggerAdapter, state: str, message: str,
                  stage: str | None) -> None:
    """The imagenet-summary artifact of a run that failed or was cancelled: what ran, what
    stopped and why, what a rerun does. Best effort: the run's own state says the cause."""
    base = _base_stage(stage) if stage else None
    after = STAGES.index(base) + 1 if base in STAGES else len(STAGES)
    not_reached = [s for s in r.p.stages if STAGES.index(s) >= after]
    rerun = (f"{stage} resumes from the snapshot it wrote, then trains on"
             if state == "Cancelled" and base == "train" and "snapshot" in message else "")
    try:
        create_markdown_artifact(
            markdown=report.stopped_summary_markdown(
                r.runs, state=state, message=message, stage=stage, stopped=r.stopped,
                failed=r.failed_beside,
                not_reached=not_reached, data_root=str(r.root), changes=r.changes, rerun=rerun),
            key=report.ARTIFACT_KEY_SUMMARY, description=f"imagenet pipeline summary ({state})")
    except Exception as err:  # noqa: BLE001 - the state message says it all the same
        log.debug("could not write the summary artifact: %s", err)


def _scrub_sources(p: PipelineParams) -> None:
    """Replace the stored parameters of this flow run by their masked form (best effort: the
    run was created with them; README, "Mirror credentials")."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    params = {**ctx.flow_run.parameters,
              "sources": acquire.masked_sources(p.sources.model_dump())}
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(ctx.flow_run.id, parameters=params)
    except Exception as err:  # noqa: BLE001 - the refusal itself matters more
        get_run_logger().debug("could not mask the stored parameters: %s", err)


def _failed(log: logging.LoggerAdapter, message: str, err: BaseException) -> State:
    """End the flow run Failed with `message` (one line) as its state message; the traceback
    only at DEBUG."""
    log.debug("the flow run failed", exc_info=err)
    log.error("%s", message)
    report.announce(message, {"message": message}, event=report.FAILED_EVENT)
    return Failed(message=message)


def _conversion(p: PipelineParams, train_lmdb: Path, log: logging.LoggerAdapter
                ) -> tuple[dict[str, Any], list[str]]:
    """The convert stage's parameters: those given, the rest as the data root's LMDBs were
    built (tasks.convert.recorded_conversion), else the defaults; and the changes from what was
    built ("resize_height 64 -> 256"), which the run states rather than makes silently."""
    recorded = convert.recorded_conversion(train_lmdb)
    size = recipes.RECIPES[p.zoo_net()].record_size if p.zoo_net() else DEFAULT_RESIZE
    defaults = {"resize_height": size, "resize_width": size, "encoded": False,
                "resize_mode": "squash"}
    params: dict[str, Any] = {}
    reused = []
    for name, default in defaults.items():
        given = getattr(p, name)
        if given is None and name in recorded:
            reused.append(f"{name} {recorded[name]}")
        params[name] = given if given is not None else recorded.get(name, default)
    params["shuffle_seed"] = p.shuffle_seed
    if reused:
        log.info("convert: %s, as the data root's LMDBs were built (give the parameter to "
                 "change it)", ", ".join(reused))
    changes = [f"{name} {recorded[name]} -> {params[name]}" for name in convert.CONVERSION_PARAMS
               if name in recorded and recorded[name] != params[name]]
    return params, changes


NETS_DIR = "nets"  # <data root>/nets/<net>/: the zoo recipe sized to this data root's classes


def _folder_listings(r: _Runner, listings: dict[str, Path]) -> None:
    """The listings stage of your own images: keyed on the folder's fingerprint (every file's
    path, size and mtime), so adding or replacing an image reruns it, and what depends on it."""
    p = r.p
    images = Path(p.images).resolve()
    seed = p.shuffle_seed if p.shuffle_seed is not None else DEFAULT_SHUFFLE_SEED
    with r.stage("listings"):
        key = stage_key("listings_folder", code=folder.FOLDER_LISTINGS_CODE,
                        params={"images": str(images), "files": image_folder.fingerprint(images),
                                "val_percent": p.val_percent, "seed": seed})
    r.call("listings", folder.write_folder_listings, "listings", key=key,
           outputs=list(listings.values()), data_root=str(r.root), images=str(images),
           val_percent=p.val_percent, seed=seed)


def _count_lines(path: Path) -> int:
    """Non-blank lines of a listing (one class or one image each)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        raise ImagenetError(f"{path}: not found (has the listings stage run?)") from None


def _sized_net(r: _Runner, log: logging.LoggerAdapter, listings: dict[str, Path]
               ) -> recipes.SizedRecipe:
    """The --net recipe sized to the dataset's classes (model/zoo/recipes.py), written under
    <data root>/nets/. With your own images its classifier layers get new names (fresh weights
    when finetuning, as in Caffe's flickr_style example)."""
    p = r.p
    classes_file = listings.get(image_folder.LABELS_FILE) or listings[SYNSETS_FILE]
    classes = _count_lines(classes_file)
    val_images = _count_lines(r.root / VAL_LIST)
    rename = recipes.layer_suffix(Path(p.images).resolve().name) if p.images else None
    sized = recipes.write_sized_recipe(
        p.zoo_net(), r.root / NETS_DIR / p.zoo_net(), classes=classes, rename=rename,
        finetune_lr_factor=p.finetune_lr_factor if p.weights else 1.0, val_images=val_images)
    log.info("%s", sized.describe())
    return sized


def _run_stages(r: _Runner, log: logging.LoggerAdapter) -> dict[str, Any]:
    p, root = r.p, r.root
    # Your own images (p.images) replace the archives: no mini, download or extract stage.
    sources = {} if p.images else {kind: getattr(p.sources, kind) for kind in ARCHIVES}
    checksums = p.sources.checksums
    if r.wanted("train") or r.wanted("evaluate"):
        # the solver's mistakes now, not after hours of downloading and converting
        with r.stage("train" if r.wanted("train") else "evaluate"):
            training.check_solver_file(p.solver, p.max_iter)

    # 0. The built-in mini ILSVRC12, when the sources name it (part of the download stage).
    with r.stage("mini-ilsvrc12"):
        sizes = {acquire.mini_size(src) for src in sources.values()} - {None}
    if len(sizes) > 1:
        raise StageFailed("mini-ilsvrc12", f"sources name different mini sizes {sorted(sizes)}: "
                          "use one")
    if sizes:
        size = sizes.pop()
        mini = acquire.mini_outputs(root, size)
        if r.wanted("download"):
            key = stage_key("mini", code=acquire.MINI_CODE,
                            params={"size": size, "seed": acquire.MINI_SEED})
            r.call("download", acquire.build_mini, "mini-ilsvrc12", key=key,
                   outputs=list(mini.values()), data_root=str(root), size=size)
        sources = {kind: str(mini[kind]) if acquire.mini_size(src) else src
                   for kind, src in sources.items()}
        checksums = checksums or str(mini["checksums"])
    archives = {kind: acquire.archive_path(root, src) for kind, src in sources.items()}

    # 1. Downloads, concurrently (each retried on transient network errors).
    if r.wanted("download"):
        with r.stage("download"):
            md5s = acquire.fetch_checksums(checksums)
        # A missing local archive fails the stage before any download starts: nothing is left
        # downloading beside a run that cannot go on.
        for kind, problem in acquire.check_local_sources(sources).items():
            raise StageFailed(f"download-{kind}", problem)
        group = StageGroup()  # a failed download stops the others (no retrying, no Crashed)
        try:
            for kind, src in sources.items():
                with r.stage(f"download-{kind}"):
                    md5 = md5s.get(acquire.archive_name(src))
                    key = stage_key("download", code=acquire.DOWNLOAD_CODE,
                                    params=acquire.download_identity(src, md5))
                    group.submit(
                        acquire.download_archive, f"download-{kind}", results_root=root,
                        cache_key=key, outputs=[archives[kind]], force=r.forced("download"),
                        after=r.after("mini-ilsvrc12"), source=src, data_root=str(root),
                        md5=md5)
        except BaseException as err:
            group.abort.set(str(err))
            group.wait_quietly()
            raise
        try:
            group.wait()
        finally:
            for run in group.runs:
                r.record(run)
            r.stopped.extend(group.stopped)
            r.failed_beside.extend((e.stage, e.cause) for e in group.failed[1:])

    # 2. Extraction.
    trees = {"train": root / "train", "val": root / "val"}
    if r.wanted("extract") and not p.images:
        for kind, task in (("train", acquire.extract_train), ("val", acquire.extract_val)):
            with r.stage(f"extract-{kind}"):
                key = stage_key(f"extract_{kind}", code=acquire.EXTRACT_CODE,
                                inputs={"archive": archives[kind]})
            r.call("extract", task, f"extract-{kind}", key=key, outputs=[trees[kind]],
                   after=r.after(f"download-{kind}"), archive=str(archives[kind]),
                   data_root=str(root))

    # 3. Listings (Caffe's synsets.txt, synset_words.txt, train.txt, val.txt).
    listings = acquire.listing_paths(root)
    if p.images:  # the class folders under p.images (tasks/folder.py)
        with r.stage("listings"):
            trees = image_folder.image_roots(p.images)
            listings = folder.listing_paths(root)
        if r.wanted("listings"):
            _folder_listings(r, listings)
    elif r.wanted("listings"):
        with r.stage("listings"):
            key = stage_key("listings", code=acquire.LISTINGS_CODE,
                            inputs={"aux": archives["aux"], **trees})
        r.call("listings", acquire.write_listings, "listings", key=key,
               outputs=list(listings.values()),
               after=r.after("download-aux", "extract-train", "extract-val"),
               data_root=str(root), aux=str(archives["aux"]))

    # 4. The two LMDBs.
    lmdbs = {split: convert.lmdb_path(root, split) for split in ("train", "val")}
    converted: set[str] = set()
    if r.wanted("convert"):
        conv_params, changes = _conversion(p, lmdbs["train"], log)
        for split, listname in (("train", TRAIN_LIST), ("val", VAL_LIST)):
            listfile = root / listname
            with r.stage(f"convert-{split}"):
                # Your own images: the listing's manifest digest covers the size and mtime of
                # every image it names (their folder has no manifest of ours).
                inputs = ({"listfile": listfile} if p.images
                          else {"images": trees[split], "listfile": listfile})
                key = stage_key(f"convert_{split}", code=convert.CONVERT_CODE, inputs=inputs,
                                params={**conv_params, **({"image_root": str(trees[split])}
                                                          if p.images else {})})
            run = r.call("convert", convert.convert_lmdb, f"convert-{split}", key=key,
                         outputs=[lmdbs[split]], after=r.after("listings", f"extract-{split}"),
                         split=split, data_root=str(root), image_root=str(trees[split]),
                         listfile=str(listfile), workers=p.workers, **conv_params)
            if run.ran:
                converted.add(split)
        if converted and changes:
            change = f"LMDBs rebuilt with {', '.join(changes)}"
            log.warning("convert: %s; the mean follows the train LMDB, and training uses "
                        "the configuration folder of the new data", change)
            r.changes.append(change)

    # 5. The mean file. It belongs to the train LMDB: when that was rebuilt in this run, or the
    # mean on disk is another LMDB's, it is brought up to date even when `stages` leaves it out
    # (from convert's sums: seconds), so training never meets a mean of another size.
    mean_file = convert.mean_path(root)
    follow = not r.wanted("mean") and (
        "train" in converted or r.wanted("train") or r.wanted("evaluate"))
    if r.wanted("mean") or follow:
        key = None
        with r.stage("mean"):
            try:
                key = stage_key("mean", code=convert.MEAN_CODE, inputs={"lmdb": lmdbs["train"]})
            except ImagenetError:
                if not follow:
                    raise
        if key is not None and follow and stale_reason([mean_file], key):
            log.info("mean: not in `stages`, but the mean on disk does not belong to the train "
                     "LMDB: computing it again")
        if key is not None and (not follow or stale_reason([mean_file], key)):
            r.call("mean", convert.compute_mean, "mean", key=key, outputs=[mean_file],
                   after=r.after("convert-train"), data_root=str(root),
                   train_lmdb=str(lmdbs["train"]))

    # 6. Training, one segment per snapshot interval, and 7. evaluation of the final weights.
    test_rows: list[dict[str, Any]] = []
    loss_rows: list[dict[str, Any]] = []
    final: dict[str, Any] | None = None
    outputs: dict[str, str] = {"train LMDB": str(lmdbs["train"]), "val LMDB": str(lmdbs["val"]),
                               "mean": str(mean_file)}
    plan = None
    data_after = r.after("convert-train", "convert-val", "mean")
    if r.wanted("train") or r.wanted("evaluate"):
        with r.stage("train" if r.wanted("train") else "evaluate"):
            solver = str(_sized_net(r, log, listings).solver) if p.zoo_net() else p.solver
            plan = training.prepare_training(
                root, solver, train_lmdb=lmdbs["train"], val_lmdb=lmdbs["val"],
                mean_file=mean_file, max_iter=p.max_iter, snapshot_interval=p.snapshot_interval,
                processes=p.processes, devices=p.devices, weights=p.weights,
                resize_mode=convert.recorded_conversion(lmdbs["train"]).get("resize_mode",
                                                                            "squash"),
                image_listings={"train": (root / TRAIN_LIST, trees["train"]),
                                "val": (root / VAL_LIST, trees["val"])})
        for note in plan.bundle_notes:
            log.warning("%s", note)
        data_inputs = {"train": lmdbs["train"], "val": lmdbs["val"], "mean": mean_file}
        if plan is not None:  # a net with ImageData layers reads the listings and images too
            data_inputs.update({f"{split}_{i}": Path(x)
                                for split, xs in plan.image_inputs.items()
                                for i, x in enumerate(xs)})
    last_segment: list[State | None] = []
    if plan is not None and r.wanted("train"):
        start = 0
        for end in plan.segment_ends:
            name = f"train-{start}-{end}"
            with r.stage(name):
                # The configuration id covers the solver and net without their paths (the
                # written copies hold this data root's), so a moved root keeps the key.
                key = stage_key("train", code=training.TRAIN_CODE, inputs=data_inputs,
                                params={"config": plan.config_id, "end_iter": end})
            run = r.call("train", training.train_segment, name, key=key,
                         outputs=list(training.snapshot_files(plan.snapshot_prefix, end)),
                         after=last_segment or data_after,
                         solver=plan.solver, snapshot_prefix=plan.snapshot_prefix,
                         start_iter=start, end_iter=end, max_iter=plan.max_iter,
                         devices=p.devices, restart=start == 0 and r.forced("train"),
                         processes=p.processes, workers=p.workers or None,
                         weights=plan.weights)
            test_rows.extend(run.result.record.get("tests", []))
            loss_rows.extend(run.result.record.get("losses", []))
            last_segment = r.after(name)
            start = end
    if plan is not None:
        weights, _ = training.snapshot_files(plan.snapshot_prefix, plan.max_iter)
        outputs["final weights"] = str(weights)
        if weights.is_file():
            # `imagenet classify --weights=<data root>/training/latest.caffemodel IMAGE`
            outputs["latest weights (link)"] = str(training.link_latest(root, weights))
        if plan.bundle:
            outputs["inference bundle"] = plan.bundle
    if plan is not None and r.wanted("evaluate"):
        val_manifest = read_manifest(lmdbs["val"]) or {}
        val_count = int(val_manifest.get("record", {}).get("count", 0))
        iterations = training.eval_iterations(val_count, plan.test_batch_size)
        out = training.eval_path(plan, plan.max_iter)
        with r.stage("evaluate"):
            key = stage_key("evaluate", code=training.TRAIN_CODE,
                            inputs={"weights": weights, **data_inputs},
                            params={"config": plan.config_id, "iterations": iterations})
        # A val LMDB rebuilt in this run is re-scored even when its digest is unchanged: the
        # evaluation is cheap and is the check that the weights score on what is on disk now.
        run = r.call("evaluate", training.evaluate_weights, "evaluate", key=key, outputs=[out],
                     force=training.WHY_VAL_REBUILT if "val" in converted else False,
                     after=last_segment or data_after, net=plan.net, weights=str(weights),
                     iterations=iterations, output=str(out),
                     accuracy_top_k=plan.accuracy_top_k, devices=p.devices)
        final = run.result.record
        outputs["metrics"] = str(out)

    # 8. What the UI and the terminal show.
    datasets = {}
    for split in ("train", "val"):
        m = read_manifest(lmdbs[split])
        if m:
            rec = m.get("record", {})
            datasets[split] = {k: rec.get(k) for k in ("count", "skipped", "total_lines")}
    # A segment that resumes at a test iteration tests again there (Caffe's Step tests at the
    # start of an iteration): one row per iteration, the latest.
    test_rows = sorted({row["iter"]: row for row in test_rows}.values(), key=lambda row: row["iter"])
    if test_rows:
        create_table_artifact(table=report.rounded_rows(test_rows), key=report.ARTIFACT_KEY_METRICS,
                              description="test outputs per test interval")
    curve = None
    if plan is not None and test_rows:
        curve = report.render_curve(test_rows + loss_rows, Path(plan.run_dir) / report.CURVE_FILE)
    if p.images:
        outputs["labels"] = str(listings[image_folder.LABELS_FILE])
    notes = [note for run in r.runs if run.name == "listings"
             for note in run.result.record.get("notes", [])]
    create_markdown_artifact(
        markdown=report.summary_markdown(r.runs, data_root=str(root), datasets=datasets,
                                         final=final, outputs=outputs, curve=curve,
                                         notes=notes + [f"this run: {c}" for c in r.changes]),
        key=report.ARTIFACT_KEY_SUMMARY, description="imagenet pipeline summary")
    table = report.stage_table_rows(r.runs)
    # One line, not the table: `imagenet pipeline` and `make demo` print the table, and Prefect
    # echoes flow logs to the same terminal (the UI has it in the summary artifact).
    counts = {status: sum(row["status"] == status for row in table) for status in ("ran", "cached")}
    log.info("stages: %d ran, %d cached (table in the %r artifact)", counts["ran"],
             counts["cached"], report.ARTIFACT_KEY_SUMMARY)
    weights = outputs.get("final weights") if final else None
    line = report.final_line(final, weights, data_root=str(root))
    log.info("%s", line)
    report.announce(line, {"top1": final.get("top1") if final else None,
                           "top5": final.get("top5") if final else None, "weights": weights})
    return {
        "stages": table,
        "top1": final.get("top1") if final else None,
        "top5": final.get("top5") if final else None,
        "datasets": datasets,
        "test_rows": test_rows,
        "records": {run.name: run.result.record for run in r.runs},
        "outputs": outputs,
    }
