"""The `imagenet` flow: Caffe's ImageNet workflow as one Prefect DAG.

download (train, val, aux; concurrently) -> extract (train, val) -> listings -> convert (train
and val LMDBs) -> mean -> train (one task per snapshot interval) -> evaluate -> summary.

The flow only wires tasks: for each stage it computes the cache key (tasks.cache.stage_key), asks
whether the stage's recorded outputs are intact, and calls the task with refresh_cache=True when
they are not or when the user forces the stage. Its parameters are one pydantic model, so the
Prefect UI shows them as a form and `imagenet pipeline` can build the same model from flags.
"""
from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field, field_validator

from data.ilsvrc12 import TRAIN_LIST, VAL_LIST, parse_md5sums
from tasks import acquire, convert, report
from tasks import train as training
from tasks.cache import read_manifest, stage_key
from tasks.stage import StageRun, call_stage, submit_stage

Stage = Literal["download", "extract", "listings", "convert", "mean", "train", "evaluate"]
STAGES: tuple[str, ...] = ("download", "extract", "listings", "convert", "mean", "train", "evaluate")
ARCHIVES = ("train", "val", "aux")
# Public locations: ImageNet's (login needed: put the files there yourself, or give URLs of a
# mirror) and Caffe's aux tarball as data/ilsvrc12/get_ilsvrc_aux.sh fetches it.
DEFAULT_TRAIN_URL = "https://image-net.org/data/ILSVRC/2012/ILSVRC2012_img_train.tar"
DEFAULT_VAL_URL = "https://image-net.org/data/ILSVRC/2012/ILSVRC2012_img_val.tar"
DEFAULT_AUX_URL = "http://dl.caffe.berkeleyvision.org/caffe_ilsvrc12.tar.gz"
DEFAULT_SOLVER = "model/zoo/bvlc_alexnet/solver.prototxt"
CHECKSUMS_TIMEOUT_S = 60


class Sources(BaseModel):
    """Where each archive comes from: an http(s)/file URL or a local path (used in place)."""

    train: str = Field(DEFAULT_TRAIN_URL, description="ILSVRC2012_img_train.tar")
    val: str = Field(DEFAULT_VAL_URL, description="ILSVRC2012_img_val.tar")
    aux: str = Field(DEFAULT_AUX_URL, description="Caffe's caffe_ilsvrc12.tar.gz (listings)")
    checksums: str | None = Field(
        None, description="md5sum-format file (URL or path) for archives that are not the "
        "official ones; the official ones are checked against their known md5s")


class PipelineParams(BaseModel):
    """Everything a run of the `imagenet` flow depends on."""

    sources: Sources = Field(default_factory=Sources)
    data_root: str = Field("ilsvrc12-data", description="where archives, images, LMDBs, "
                           "snapshots and the stage cache live")
    resize_height: int = Field(256, ge=0, description="convert_imageset --resize_height (0: keep)")
    resize_width: int = Field(256, ge=0, description="convert_imageset --resize_width (0: keep)")
    encoded: bool = Field(False, description="convert_imageset --encoded: store JPEG bytes")
    shuffle_seed: int | None = Field(0, description="shuffle the listings with this seed "
                                     "(reproducible, unlike Caffe's --shuffle); null: keep order")
    solver: str = Field(DEFAULT_SOLVER, description="solver.prototxt (its `net:` is the "
                        "train_val prototxt; its Data layers are pointed at this run's LMDBs)")
    max_iter: int | None = Field(None, gt=0, description="override the solver's max_iter")
    snapshot_interval: int | None = Field(None, gt=0, description="training segment length "
                                          "(default: the solver's snapshot)")
    devices: list[int] | None = Field(None, description="accelerator ids (default: all / CPU)")
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES),
                                description="which stages to run (others use what is on disk)")
    force: list[Stage] = Field(default_factory=list, description="stages to recompute even "
                               "when cached")
    workers: int = Field(0, ge=0, description="conversion worker processes (0: one per core)")

    @field_validator("stages", "force")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return sorted(set(value), key=STAGES.index)


def _read_checksums(source: str | None) -> dict[str, str]:
    if not source:
        return {}
    if "://" in source:
        with urllib.request.urlopen(source, timeout=CHECKSUMS_TIMEOUT_S) as resp:
            text = resp.read().decode()
    else:
        text = Path(source).read_text()
    return parse_md5sums(text, source)


class _Runner:
    """Per-run bookkeeping: which stages were asked for and forced, and what each did."""

    def __init__(self, p: PipelineParams, root: Path) -> None:
        self.p, self.root = p, root
        self.runs: list[StageRun] = []

    def wanted(self, stage: str) -> bool:
        return stage in self.p.stages

    def forced(self, stage: str) -> bool:
        return stage in self.p.force

    def call(self, stage: str, task: Any, name: str, *, key: str, outputs: list[Path],
             force: bool = False, **kwargs: Any) -> StageRun:
        run = call_stage(task, name, results_root=self.root, cache_key=key, outputs=outputs,
                         force=force or self.forced(stage), **kwargs)
        self.runs.append(run)
        return run


@flow(name="imagenet", log_prints=True, persist_result=False)
def imagenet(params: PipelineParams = PipelineParams()) -> dict[str, Any]:
    """Run Caffe's ImageNet workflow; every stage is cached and reruns only when needed."""
    p = params
    log = get_run_logger()
    root = Path(p.data_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    r = _Runner(p, root)
    sources = {kind: getattr(p.sources, kind) for kind in ARCHIVES}
    archives = {kind: acquire.archive_path(root, src) for kind, src in sources.items()}

    # 1. Downloads, concurrently (each retried on transient network errors).
    if r.wanted("download"):
        md5s = _read_checksums(p.sources.checksums)
        waits = []
        for kind, src in sources.items():
            md5 = md5s.get(acquire.archive_name(src))
            key = stage_key("download", code=acquire.DOWNLOAD_CODE,
                            params=acquire.download_identity(src, md5))
            waits.append(submit_stage(
                acquire.download_archive, f"download-{kind}", results_root=root, cache_key=key,
                outputs=[archives[kind]], force=r.forced("download"),
                source=src, data_root=str(root), md5=md5))
        r.runs.extend(wait() for wait in waits)

    # 2. Extraction.
    trees = {"train": root / "train", "val": root / "val"}
    if r.wanted("extract"):
        for kind, task in (("train", acquire.extract_train), ("val", acquire.extract_val)):
            key = stage_key(f"extract_{kind}", code=acquire.EXTRACT_CODE,
                            inputs={"archive": archives[kind]})
            r.call("extract", task, f"extract-{kind}", key=key, outputs=[trees[kind]],
                   archive=str(archives[kind]), data_root=str(root))

    # 3. Listings (Caffe's synsets.txt, synset_words.txt, train.txt, val.txt).
    listings = acquire.listing_paths(root)
    if r.wanted("listings"):
        key = stage_key("listings", code=acquire.LISTINGS_CODE,
                        inputs={"aux": archives["aux"], **trees})
        r.call("listings", acquire.write_listings, "listings", key=key,
               outputs=list(listings.values()), data_root=str(root), aux=str(archives["aux"]))

    # 4. The two LMDBs.
    lmdbs = {split: convert.lmdb_path(root, split) for split in ("train", "val")}
    converted: set[str] = set()
    if r.wanted("convert"):
        conv_params = {"resize_height": p.resize_height, "resize_width": p.resize_width,
                       "shuffle_seed": p.shuffle_seed, "encoded": p.encoded}
        for split, listname in (("train", TRAIN_LIST), ("val", VAL_LIST)):
            listfile = root / listname
            key = stage_key(f"convert_{split}", code=convert.CONVERT_CODE,
                            inputs={"images": trees[split], "listfile": listfile},
                            params=conv_params)
            run = r.call("convert", convert.convert_lmdb, f"convert-{split}", key=key,
                         outputs=[lmdbs[split]], split=split, data_root=str(root),
                         image_root=str(trees[split]), listfile=str(listfile),
                         workers=p.workers, **conv_params)
            if run.ran:
                converted.add(split)

    # 5. The mean file.
    mean_file = convert.mean_path(root)
    if r.wanted("mean"):
        key = stage_key("mean", code=convert.MEAN_CODE, inputs={"lmdb": lmdbs["train"]})
        r.call("mean", convert.compute_mean, "mean", key=key, outputs=[mean_file],
               data_root=str(root), train_lmdb=str(lmdbs["train"]))

    # 6. Training, one segment per snapshot interval, and 7. evaluation of the final weights.
    test_rows: list[dict[str, Any]] = []
    loss_rows: list[dict[str, Any]] = []
    final: dict[str, Any] | None = None
    outputs: dict[str, str] = {"train LMDB": str(lmdbs["train"]), "val LMDB": str(lmdbs["val"]),
                               "mean": str(mean_file)}
    plan = None
    if r.wanted("train") or r.wanted("evaluate"):
        plan = training.prepare_training(
            root, p.solver, train_lmdb=lmdbs["train"], val_lmdb=lmdbs["val"],
            mean_file=mean_file, max_iter=p.max_iter, snapshot_interval=p.snapshot_interval)
        data_inputs = {"train": lmdbs["train"], "val": lmdbs["val"], "mean": mean_file}
    if plan is not None and r.wanted("train"):
        start = 0
        for end in plan.segment_ends:
            key = stage_key("train", code=training.TRAIN_CODE,
                            inputs={"solver": plan.solver, "net": plan.net, **data_inputs},
                            params={"end_iter": end})
            run = r.call("train", training.train_segment, f"train-{start}-{end}", key=key,
                         outputs=list(training.snapshot_files(plan.snapshot_prefix, end)),
                         solver=plan.solver, snapshot_prefix=plan.snapshot_prefix,
                         start_iter=start, end_iter=end, max_iter=plan.max_iter,
                         devices=p.devices)
            test_rows.extend(run.result.record.get("tests", []))
            loss_rows.extend(run.result.record.get("losses", []))
            start = end
    if plan is not None:
        weights, _ = training.snapshot_files(plan.snapshot_prefix, plan.max_iter)
        outputs["final weights"] = str(weights)
    if plan is not None and r.wanted("evaluate"):
        val_manifest = read_manifest(lmdbs["val"]) or {}
        val_count = int(val_manifest.get("record", {}).get("count", 0))
        iterations = training.eval_iterations(val_count, plan.test_batch_size)
        out = training.eval_path(plan, plan.max_iter)
        key = stage_key("evaluate", code=training.TRAIN_CODE,
                        inputs={"net": plan.net, "weights": weights, **data_inputs},
                        params={"iterations": iterations})
        # A val LMDB rebuilt in this run is re-scored even when its digest is unchanged: the
        # evaluation is cheap and is the check that the weights score on what is on disk now.
        run = r.call("evaluate", training.evaluate_weights, "evaluate", key=key, outputs=[out],
                     force="val" in converted, net=plan.net, weights=str(weights),
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
        create_table_artifact(table=test_rows, key=report.ARTIFACT_KEY_METRICS,
                              description="test outputs per test interval")
    curve = None
    if plan is not None and test_rows:
        curve = report.render_curve(test_rows + loss_rows, Path(plan.run_dir) / "curve.png")
    create_markdown_artifact(
        markdown=report.summary_markdown(r.runs, data_root=str(root), datasets=datasets,
                                         final=final, outputs=outputs, curve=curve),
        key=report.ARTIFACT_KEY_SUMMARY, description="imagenet pipeline summary")
    table = report.stage_table_rows(r.runs)
    # One line, not the table: `imagenet pipeline` and `make demo` print the table, and Prefect
    # echoes flow logs to the same terminal (the UI has it in the summary artifact).
    counts = {status: sum(row["status"] == status for row in table) for status in ("ran", "cached")}
    log.info("stages: %d ran, %d cached (table in the %r artifact)", counts["ran"],
             counts["cached"], report.ARTIFACT_KEY_SUMMARY)
    return {
        "stages": table,
        "top1": final.get("top1") if final else None,
        "top5": final.get("top5") if final else None,
        "datasets": datasets,
        "test_rows": test_rows,
        "records": {run.name: run.result.record for run in r.runs},
        "outputs": outputs,
    }
