"""Kill campaign: each `imagenet` command SIGKILLed at seeded random instants inside its work,
then rerun; the rerun's outputs must equal an uninterrupted run's byte for byte, and nothing may
be left behind.

    python benchmarks/faults.py --trials 100 [--commands convert,extract,train,flow] [--seed 0]
    python benchmarks/faults.py --commands deploy --trials 21 --port 4214

Scenarios (SCENARIOS), each on tiny generated inputs built once:
- convert: `imagenet convert-imageset` of generated JPEGs (resized). The rerun is the same
  command when the killed run left no DB (a DB that exists must already be the exact one).
- extract: `imagenet extract` of an ILSVRC2012_img_train-shaped tar of per-synset tars; the rerun
  is the same command (it resumes per synset).
- train: `imagenet train` of a tiny net with a snapshot every 2 iterations; the rerun resumes from
  the highest-iteration `.solverstate` on disk, whatever state the kill left (so every
  `.solverstate` that can exist must resume exactly), or starts afresh when there is none.
- flow: `imagenet pipeline --stages convert` on a data root the mini ILSVRC12 was fetched,
  extracted and listed into; the rerun is the same command. Needs a Prefect API
  (PREFECT_API_URL); without one the script starts a temporary server for the campaign.

- deploy: deployment runs of imagenet/mini-pipeline (the tiny mini, 20 iterations) through
  `make up`'s own code (flows.services.up: server, work pool, deployments, worker) on a port,
  run folder and Prefect home of the campaign's; each trial SIGKILLs the worker, the flow-run
  process or the server (in turn) at a seeded instant of the run; after a worker's or server's
  kill it does what a user does, `make down` then `make up`; the deployment runs again on the
  same data root when the killed run did not complete, and every file of the data root is
  compared with an uninterrupted run's (run_deploy_campaign).

Kill instants: a trial either STEPS the process (after a marker file shows the work has begun,
it runs for STEP_S, is stopped with SIGSTOP, and so on; it is killed after a seeded number of
steps drawn below the number the uninterrupted reference run needed) or waits for a seeded
trigger file to appear (a snapshot's side file, caffemodel or solverstate; a finished DB; a
synset's marker) and kills at once, which lands between the files of one snapshot.

Each trial reports: whether the kill landed inside the work (a process that had already exited
is a miss), whether the rerun exited 0 with outputs equal to the reference, and what files the
kill left that the reference does not have, before and after the rerun. The script prints the
CPU model and counts per scenario; benchmarks/README.md has the latest figures.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header  # noqa: E402  (benchmarks/common.py: CPU model, ISA flags, load)

# One running window of a stepped process, and how often a trigger file is looked for.
STEP_S = 0.005
POLL_S = 0.0005
# Seconds a run may take before the campaign gives up on it (a hang is a failure too).
RUN_TIMEOUT_S = 600
# Generated inputs: images per scenario and their size; the tiny net's iterations.
CONVERT_IMAGES = 240
EXTRACT_SYNSETS, EXTRACT_PER_SYNSET = 8, 30
IMAGE_WH = (160, 120)
RESIZE = 32
TRAIN_RECORDS = 24
# Files that are not outputs: LMDB's lock file (its reader table differs per run) and the logs.
IGNORED_NAMES = frozenset({"lock.mdb"})
IGNORED_DIRS = frozenset({".prefect", "logs"})

TINY_NET = """name: "FaultsTiny"
layer { name: "data" type: "Data" top: "data" top: "label"
  transform_param { crop_size: 10 mirror: true mean_value: 120 scale: 0.02 }
  data_param { source: "train_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc1" type: "InnerProduct" bottom: "conv1" top: "fc1"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc1" bottom: "label" top: "loss" }
"""
TINY_SOLVER = """net: "net.prototxt"
base_lr: 0.05
lr_policy: "step"
gamma: 0.5
stepsize: 3
momentum: 0.9
weight_decay: 0.0005
display: 1
max_iter: 8
snapshot: 2
snapshot_prefix: "tiny"
random_seed: 7
"""
TRAIN_PREFIX = "tiny"
TRAIN_SNAPSHOTS = (2, 4, 6, 8)


# ------------------------------------------------------------------ inputs


def _jpeg(rng: np.random.Generator) -> bytes:
    import cv2

    w, h = IMAGE_WH
    small = rng.integers(0, 256, (6, 8, 3), np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".JPEG", img)
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return buf.tobytes()


def make_images(root: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs under root/images/ and a Caffe listing root/list.txt (4 labels)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        name = f"img_{i:05d}.JPEG"
        (root / "images" / name).write_bytes(_jpeg(rng))
        lines.append(f"{name} {i % 4}\n")
    (root / "list.txt").write_text("".join(lines))
    return root


def _tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_train_tar(root: Path, seed: int = 0) -> Path:
    """An ILSVRC2012_img_train-shaped tar: one tar per synset, each of JPEGs."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    outer = []
    for s in range(EXTRACT_SYNSETS):
        wnid = f"n{1440764 + s:08d}"
        inner = [(f"{wnid}_{i}.JPEG", _jpeg(rng)) for i in range(EXTRACT_PER_SYNSET)]
        outer.append((f"{wnid}.tar", _tar_of(inner)))
    path = root / "ILSVRC2012_img_train.tar"
    path.write_bytes(_tar_of(outer))
    return path


def make_tiny_training(root: Path, seed: int = 11) -> Path:
    """A tiny LMDB (learnable pattern per label), net and solver, as tests/model use."""
    from data.datum import encode_datum_bytes
    from data.lmdb_io import LmdbWriter

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    with LmdbWriter(root / "train_lmdb") as writer:
        for i in range(TRAIN_RECORDS):
            label = i % 4
            img = rng.integers(0, 256, size=(3, 12, 12), dtype=np.uint8)
            img[label % 3, :, label:] //= 2
            writer.put(f"{i:08d}_img".encode(), encode_datum_bytes(img, label))
    (root / "net.prototxt").write_text(TINY_NET)
    (root / "solver.prototxt").write_text(TINY_SOLVER)
    return root


# ------------------------------------------------------------------ the tree of a run


def tree_digests(root: Path, volatile: tuple[str, ...] = ()) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` that is an output ("present" for
    files whose names end with one of `volatile`: only their existence is compared)."""
    out = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if (path.is_file() and path.name not in IGNORED_NAMES
                and not IGNORED_DIRS.intersection(rel.parts)):
            out[rel.as_posix()] = ("present" if path.name.endswith(volatile) else
                                   hashlib.sha256(path.read_bytes()).hexdigest())
    return out


# ------------------------------------------------------------------ scenarios


@dataclass
class Scenario:
    """One command under test. `setup(inputs, env)` builds its inputs once; `prepare(inputs, run)`
    readies a run folder and returns it (a fresh `run`, or a folder of the inputs the scenario
    reuses: then `own_runs` is False); `argv(run)` is the first run; `rerun(run)` the argv after
    a kill (None: nothing to rerun); `started(run)` says the work has begun; `triggers` are
    files (relative to the run folder, globs allowed) whose appearance is a kill point;
    `outputs(run)` is the folder compared with the reference, where nothing else may remain;
    files ending with one of `volatile` are compared by presence only."""

    name: str
    setup: Callable[[Path, dict[str, str]], None]
    prepare: Callable[[Path, Path], Path]
    argv: Callable[[Path], list[str]]
    rerun: Callable[[Path], list[str] | None]
    started: Callable[[Path], bool]
    triggers: list[str]
    outputs: Callable[[Path], Path]
    env: dict[str, str] = field(default_factory=dict)
    own_runs: bool = True
    volatile: tuple[str, ...] = ()


def _fresh(inputs: Path, run: Path) -> Path:
    run.mkdir(parents=True)
    return run


def _copy_of_inputs(inputs: Path, run: Path) -> Path:
    shutil.copytree(inputs, run)
    return run


def _imagenet(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def _any(run: Path, pattern: str) -> bool:
    """Whether a file matching `pattern` (a relative path, maybe with glob characters) exists."""
    if not any(c in pattern for c in "*?["):
        return os.path.lexists(run / pattern)
    return next(run.glob(pattern), None) is not None


def convert_scenario() -> Scenario:
    def argv(run: Path) -> list[str]:
        inputs = run.parent.parent / "inputs"
        return _imagenet("convert-imageset", f"--resize_height={RESIZE}",
                         f"--resize_width={RESIZE}", "--workers=2",
                         str(inputs / "images") + "/", str(inputs / "list.txt"), str(run / "db"))

    return Scenario(
        name="convert", setup=lambda inputs, env: make_images(inputs, CONVERT_IMAGES),
        prepare=_fresh, argv=argv,
        # A DB that exists was renamed into place complete: there is nothing to redo.
        rerun=lambda run: None if (run / "db").exists() else argv(run),
        started=lambda run: _any(run, ".db.partial-*"),
        triggers=["db/data.mdb"], outputs=lambda run: run)


def extract_scenario() -> Scenario:
    def argv(run: Path) -> list[str]:
        tar = run.parent.parent / "inputs" / "ILSVRC2012_img_train.tar"
        return _imagenet("extract", str(tar), f"--to={run / 'root'}")

    wnids = [f"n{1440764 + s:08d}" for s in range(EXTRACT_SYNSETS)]
    return Scenario(
        name="extract", setup=lambda inputs, env: make_train_tar(inputs),
        prepare=_fresh, argv=argv, rerun=argv,
        started=lambda run: (run / "root" / ".extract-state").exists(),
        triggers=[f"root/.extract-state/train/{w}.done" for w in wnids[::3]]
        + [f"root/train/{w}" for w in wnids[1::3]],
        outputs=lambda run: run / "root")


def _latest_solverstate(run: Path) -> Path | None:
    found = []
    for path in run.glob(f"{TRAIN_PREFIX}_iter_*.solverstate"):
        try:
            found.append((int(path.name.split("_iter_")[1].split(".")[0]), path))
        except ValueError:
            continue
    return max(found)[1] if found else None


def train_scenario() -> Scenario:
    def rerun(run: Path) -> list[str]:
        latest = _latest_solverstate(run)
        extra = [f"--snapshot={latest.name}"] if latest is not None else []
        return _imagenet("train", "--solver=solver.prototxt", *extra)

    triggers = []
    for it in TRAIN_SNAPSHOTS:
        stem = f"{TRAIN_PREFIX}_iter_{it}"
        for suffix in (".resume.json", ".caffemodel", ".solverstate"):
            # the file itself, or its temporary while it is being written (data/atomic.py)
            triggers += [stem + suffix, f".{stem}{suffix}.*.tmp"]
    return Scenario(
        name="train", setup=lambda inputs, env: make_tiny_training(inputs),
        prepare=_copy_of_inputs,
        argv=lambda run: _imagenet("train", "--solver=solver.prototxt"), rerun=rerun,
        # The metrics log gets its first line after the first step: compiling is done.
        started=lambda run: (run / f"{TRAIN_PREFIX}_metrics.jsonl").exists()
        and (run / f"{TRAIN_PREFIX}_metrics.jsonl").stat().st_size > 0,
        triggers=triggers, outputs=lambda run: run,
        env={"IMAGENET_ALLOCATOR": "system"})


FLOW_PARAMS = ("--train=mini:tiny", "--val=mini:tiny", "--aux=mini:tiny",
               f"--resize_height={RESIZE}", f"--resize_width={RESIZE}", "--workers=2")


def flow_scenario() -> Scenario:
    """The convert stage of the flow, on ONE data root the earlier stages filled (their
    manifests hold the folders' inode and mtime, so a copy of the root would not count as
    produced); each trial removes the LMDBs first."""

    def setup(inputs: Path, env: dict[str, str]) -> None:
        out = subprocess.run(_imagenet("pipeline", f"--data_root={inputs / 'root'}",
                                       *FLOW_PARAMS, "--stages=download,extract,listings"),
                             cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=RUN_TIMEOUT_S)
        if out.returncode != 0:
            raise RuntimeError(f"preparing the flow's data root failed:\n{out.stderr[-3000:]}")

    def prepare(inputs: Path, run: Path) -> Path:
        root = inputs / "root"
        shutil.rmtree(root / "lmdb", ignore_errors=True)
        return root

    def argv(root: Path) -> list[str]:
        return _imagenet("pipeline", f"--data_root={root}", *FLOW_PARAMS, "--stages=convert")

    return Scenario(
        name="flow", setup=setup, prepare=prepare, argv=argv, rerun=argv,
        started=lambda root: (root / "lmdb").is_dir() and _any(root, "lmdb/.*.partial-*"),
        triggers=["lmdb/ilsvrc12_train_lmdb/data.mdb", "lmdb/ilsvrc12_val_lmdb/data.mdb",
                  "lmdb/ilsvrc12_train_lmdb.manifest.json"],
        outputs=lambda root: root / "lmdb", own_runs=False,
        # A manifest records its LMDB's inode and mtime: new on every build.
        volatile=(".manifest.json",))


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "convert": convert_scenario, "extract": extract_scenario, "train": train_scenario,
    "flow": flow_scenario}


# ------------------------------------------------------------------ running and killing


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@dataclass
class Outcome:
    killed: bool      # SIGKILLed while it still ran (else it had exited: a miss)
    steps: int        # steps it ran after the marker (step mode)
    returncode: int | None


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_and_kill(argv: list[str], run: Path, env: dict[str, str], started: Callable[[Path], bool],
                 *, kill_after_steps: int | None = None, trigger: str | None = None,
                 log: Path | None = None) -> Outcome:
    """Run `argv` in its own process group; kill it with SIGKILL after `kill_after_steps` steps
    of STEP_S past the marker, or when `trigger` appears; with neither, step it to the end and
    count the steps (the reference). Returns what happened."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, cwd=run, env=env, start_new_session=True, stdout=out,
                            stderr=out)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    steps = 0
    try:
        if trigger is not None:
            while proc.poll() is None and time.monotonic() < deadline:
                if _any(run, trigger):
                    _signal(proc, signal.SIGKILL)
                    proc.wait()
                    return Outcome(True, 0, proc.returncode)
                time.sleep(POLL_S)
        else:
            while proc.poll() is None and not started(run) and time.monotonic() < deadline:
                time.sleep(POLL_S)
            while proc.poll() is None and time.monotonic() < deadline:
                if kill_after_steps is not None and steps >= kill_after_steps:
                    _signal(proc, signal.SIGKILL)
                    proc.wait()
                    return Outcome(True, steps, proc.returncode)
                _signal(proc, signal.SIGCONT)
                time.sleep(STEP_S)
                _signal(proc, signal.SIGSTOP)
                steps += 1
            _signal(proc, signal.SIGCONT)
        if proc.poll() is None:  # the deadline passed: a hang
            _signal(proc, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"{' '.join(argv)} ran longer than {RUN_TIMEOUT_S} s")
        return Outcome(False, steps, proc.returncode)
    finally:
        if proc.poll() is None:
            _signal(proc, signal.SIGKILL)
            proc.wait()
        if log:
            out.close()


@dataclass
class Trial:
    index: int
    mode: str               # "step" or "file"
    point: str              # the step count or the trigger file
    landed: bool            # the kill hit a running process
    exact: bool             # rerun exit 0 and outputs equal to the reference
    left_by_kill: list[str]  # files the kill left that the reference does not have
    left_after: list[str]   # ... still there after the rerun
    problem: str = ""


@dataclass
class Campaign:
    scenario: str
    reference_steps: int
    trials: list[Trial]

    def counts(self) -> dict[str, int]:
        t = self.trials
        return {"trials": len(t), "landed": sum(x.landed for x in t),
                "exact": sum(x.exact for x in t),
                "kill left temporaries": sum(bool(x.left_by_kill) for x in t),
                "left behind after rerun": sum(bool(x.left_after) for x in t)}

    def line(self) -> str:
        c = self.counts()
        return (f"{self.scenario:8s} trials {c['trials']:4d}  kill inside the work "
                f"{c['landed']:4d}  exact reruns {c['exact']:4d}  kills that left temporaries "
                f"{c['kill left temporaries']:4d}  left behind after rerun "
                f"{c['left behind after rerun']:4d}  (reference: {self.reference_steps} steps "
                f"of {STEP_S * 1000:g} ms)")


def run_campaign(name: str, trials: int, workdir: Path, seed: int = 0, *,
                 plans: list[tuple[str, str | None]] | None = None,
                 extra_env: dict[str, str] | None = None,
                 progress: Callable[[Trial], None] | None = None) -> Campaign:
    """Reference run, then `trials` killed-and-rerun trials of scenario `name` under workdir.

    Each trial's kill is drawn from the seeded generator (step or trigger mode, then the
    step count or the trigger), or given by `plans`: (mode, point) per trial, a point of None
    being drawn."""
    scenario = SCENARIOS[name]()
    base = workdir / name
    inputs = base / "inputs"
    env = _env({**scenario.env, **(extra_env or {}),
                # one XLA compilation for all the runs of the campaign
                "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax-cache"),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    if not inputs.exists():
        scenario.setup(inputs, env)
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ref_run = base / "runs" / "reference"
    if ref_run.exists():
        shutil.rmtree(ref_run)
    ref_run = scenario.prepare(inputs, ref_run)
    ref = run_and_kill(scenario.argv(ref_run), ref_run, env, scenario.started,
                       log=logs / "reference.log")
    if ref.returncode != 0:
        raise RuntimeError(f"{name}: the uninterrupted reference run failed (exit "
                           f"{ref.returncode}); see {logs / 'reference.log'}")
    reference = tree_digests(scenario.outputs(ref_run), scenario.volatile)
    if scenario.own_runs:
        shutil.rmtree(ref_run)
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    results = []
    for i in range(trials):
        run = base / "runs" / f"trial-{i:04d}"
        if run.exists():
            shutil.rmtree(run)
        run = scenario.prepare(inputs, run)
        log = logs / f"trial-{i:04d}.log"
        mode, point = plans[i] if plans is not None else (
            "file" if scenario.triggers and rng.random() < 0.5 else "step", None)
        if mode == "file":
            if point is None:
                point = scenario.triggers[int(rng.integers(len(scenario.triggers)))]
            outcome = run_and_kill(scenario.argv(run), run, env, scenario.started,
                                   trigger=point, log=log)
        else:
            point = point if point is not None else str(int(rng.integers(0, max(ref.steps, 1))))
            outcome = run_and_kill(scenario.argv(run), run, env, scenario.started,
                                   kill_after_steps=int(point), log=log)
        out_root = scenario.outputs(run)
        left_by_kill = sorted(set(tree_digests(out_root)) - set(reference))
        problem = ""
        rerun = scenario.rerun(run)
        if rerun is not None:
            again = run_and_kill(rerun, run, env, scenario.started, log=log)
            if again.returncode != 0:
                problem = f"rerun exited {again.returncode} (see {log})"
        got = tree_digests(out_root, scenario.volatile)
        left_after = sorted(set(got) - set(reference))
        if not problem and got != reference:
            differ = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
            problem = f"outputs differ from the reference: {differ[:5]}"
        trial = Trial(i, mode, point, outcome.killed, not problem, left_by_kill, left_after,
                      problem)
        results.append(trial)
        if progress is not None:
            progress(trial)
        if scenario.own_runs and trial.exact and not trial.left_after:
            shutil.rmtree(run)  # keep failing trials for a look
    return Campaign(name, ref.steps, results)


# ------------------------------------------------------------------ deployments through `make up`

DEPLOYMENT = "imagenet/mini-pipeline"
# The deployment's presets (mini sources, 64x64, alexnet_mini) made small enough for many
# trials: the tiny mini, 20 iterations in two training segments, then the evaluation.
DEPLOY_PARAMS = {"sources": {"train": "mini:tiny", "val": "mini:tiny", "aux": "mini:tiny"},
                 "max_iter": 20, "snapshot_interval": 10, "workers": 2}
DEPLOY_TARGETS = ("worker", "flow", "server")
DEFAULT_DEPLOY_PORT = 4214
# After a kill and the restart of what was killed: how long the killed flow run may take to
# reach a final state by itself (a worker's kill leaves its flow running; a server's kill leaves
# the flow process retrying) before it is marked Crashed, as `make down` does with a stuck run.
SETTLE_S = 180
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


@dataclass
class DeployTrial:
    index: int
    target: str              # what was SIGKILLed: "worker", "flow" (the flow-run process), "server"
    at_s: float              # seconds after the run was created
    landed: bool             # it was killed while the run was in flight
    first_state: str         # the killed run's final state
    reran: bool              # a second deployment run was needed
    exact: bool
    left_after: list[str]    # files the reference does not have, after the rerun
    orphans: list[str]       # processes of the killed flow run still alive after the rerun
    problem: str = ""


class Deployments:
    """`make up`'s services (flows.services.up: server, work pool, `prefect deploy --all`,
    worker) on a port, run folder and Prefect home of the campaign's own, and what a trial
    does to them: run the deployment, kill one of them, start it again."""

    def __init__(self, workdir: Path, port: int) -> None:
        from flows import prefect_env, services

        self.services, self.port = services, port
        self.run_dir, self.home = workdir / "services", workdir / "prefect-home"
        self.url = services.api_url(port)
        prefect_env.configure(PREFECT_HOME=str(self.home))

    def up(self) -> None:
        self.services.up(self.port, self.run_dir, self.home)

    def down(self) -> None:
        self.services.down(self.run_dir, cancel_wait_s=60)

    def pid(self, name: str) -> int | None:
        return self.services._read_pid(self.run_dir, name)

    def alive(self, name: str) -> bool:
        """Whether `name` runs (this process started it: a dead one is reaped, not a zombie)."""
        pid = self.pid(name)
        if pid is None:
            return False
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return self.services.pid_alive(pid)

    def restart(self, name: str) -> None:
        """Start `name` ("server" or "worker") again as `make up` did, if it is not running."""
        s, env = self.services, self.services.service_env(self.port, self.home)
        if self.alive(name):
            return
        argv = ([s._prefect(), "server", "start", "--host", s.HOST, "--port", str(self.port)]
                if name == "server" else
                [s._prefect(), "worker", "start", "--pool", s.POOL, "--type", "process"])
        started = s._start(name, argv, self.run_dir, env)
        if name == "server":
            s.wait_healthy(self.port, pid=started)

    def flow_process(self) -> int | None:
        """The flow-run process the worker started (its child running the flow), if any."""
        worker = self.pid("worker")
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except (OSError, IndexError):
                continue
            if worker is not None and int(fields[1]) == worker and b"python" in cmdline:
                return int(stat.parent.name)
        return None

    def submit(self, data_root: Path) -> str:
        with self.services.client(self.url) as api:
            deployment = api.read_deployment_by_name(DEPLOYMENT)
            run = api.create_flow_run_from_deployment(
                deployment.id, parameters={**DEPLOY_PARAMS, "data_root": str(data_root)})
        return str(run.id)

    def state(self, run_id: str) -> str:
        try:
            with self.services.client(self.url, timeout=5) as api:
                return api.read_flow_run(run_id).state_type.value
        except Exception:  # noqa: BLE001 - the server may be the one killed
            return "UNREACHABLE"

    def wait(self, run_id: str, timeout: float) -> str:
        """The run's state once final, or after `timeout`. A service that died meanwhile (not
        by the campaign's hand: seen once on a shared, loaded machine) is started again and
        said so, so a trial is not lost to it."""
        deadline = time.monotonic() + timeout
        state = self.state(run_id)
        while state not in FINAL_STATES and time.monotonic() < deadline:
            time.sleep(1)
            for name in ("server", "worker"):
                if not self.alive(name):
                    print(f"  ({name} found dead while waiting for {run_id}: started again)",
                          flush=True)
                    self.restart(name)
            state = self.state(run_id)
        return state

    def crash(self, run_id: str) -> None:
        from prefect.states import Crashed

        with self.services.client(self.url) as api:
            api.set_flow_run_state(run_id, Crashed(message="killed by benchmarks/faults.py"),
                                   force=True)


def _start_time(pid: int) -> str | None:
    """/proc's start time of `pid` (tells a process from a later one given the same pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _family(pid: int | None) -> dict[int, str | None]:
    """`pid` and its descendants, with their start times."""
    if pid is None:
        return {}
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return {p: _start_time(p) for p in out}


def _survivors(family: dict[int, str | None], wait_s: float = 15) -> list[str]:
    """The processes of `family` still running after `wait_s` (a parent's helpers, e.g. a
    forkserver, leave a moment after it)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [p for p, start in family.items() if start is not None and _start_time(p) == start]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    out = []
    for p in alive:
        try:
            out.append(f"{p}: {Path(f'/proc/{p}/cmdline').read_bytes()[:80]!r}")
        except OSError:
            continue
    return out


def run_deploy_campaign(trials: int, workdir: Path, seed: int = 0, *,
                        port: int = DEFAULT_DEPLOY_PORT,
                        progress: Callable[[DeployTrial], None] | None = None
                        ) -> tuple[float, list[str], list[DeployTrial]]:
    """Deployment runs of imagenet/mini-pipeline through `make up`'s services, each with one
    of the worker, the flow-run process or the server SIGKILLed at a seeded instant of the run
    (uniform over the reference run's duration). A killed flow process is left to the worker
    (which reports the run Crashed); a killed worker or server is followed by `make down` and
    `make up`. When the killed run did not complete, a second deployment run on the same data
    root must. Its outputs
    must equal an uninterrupted run's byte for byte (files that differ between two
    uninterrupted runs, e.g. manifests holding an inode, are compared by presence and listed),
    with nothing else left. Returns (reference seconds, the files compared by presence, trials)."""
    base = workdir / "deploy"
    # Every run on the same data root path: the net's data paths are in its caffemodels and the
    # stage keys, so runs on two paths differ by design.
    root = base / "root"
    deployments = Deployments(base, port)
    deployments.up()
    try:
        references = []
        seconds = 0.0
        for _ in range(2):  # the second run's time (the first compiles XLA's steps)
            shutil.rmtree(root, ignore_errors=True)
            started = time.monotonic()
            run_id = deployments.submit(root)
            state = deployments.wait(run_id, RUN_TIMEOUT_S)
            if state != "COMPLETED":
                raise RuntimeError(f"the uninterrupted deployment run {run_id} ended {state}; "
                                   f"see {deployments.run_dir / 'worker.log'}")
            seconds = time.monotonic() - started
            references.append(tree_digests(root))
        volatile = sorted(k for k in set(references[0]) | set(references[1])
                          if references[0].get(k) != references[1].get(k))
        reference = {k: ("present" if k in volatile else v) for k, v in references[1].items()}
        rng = np.random.default_rng([seed, sum(map(ord, "deploy"))])
        results = []
        for i in range(trials):
            target = DEPLOY_TARGETS[i % len(DEPLOY_TARGETS)]
            at = float(rng.uniform(0.05, 0.95)) * seconds
            shutil.rmtree(root, ignore_errors=True)
            run_id = deployments.submit(root)
            started = time.monotonic()
            while time.monotonic() - started < at and deployments.state(run_id) not in FINAL_STATES:
                time.sleep(POLL_S * 20)
            landed = deployments.state(run_id) not in FINAL_STATES
            family = _family(deployments.flow_process())
            if landed:
                if target == "worker":
                    os.kill(deployments.pid("worker"), signal.SIGKILL)
                elif target == "flow" and family:
                    os.kill(next(iter(family)), signal.SIGKILL)
                elif target == "server":
                    os.killpg(deployments.pid("server"), signal.SIGKILL)
                time.sleep(1)
            if target == "flow" or not landed:
                first = deployments.wait(run_id, SETTLE_S)  # the worker reports it Crashed
            else:
                # What a user does after a crashed server or worker: `make down` (cancels what
                # still runs, stops the rest: a killed worker's flow process too, being in its
                # process group) and `make up` (which frees the accelerator slot of the run
                # that ended with them).
                deployments.down()
                deployments.up()
                first = deployments.state(run_id)
            if first not in FINAL_STATES:
                deployments.crash(run_id)
                first = f"{first}, marked CRASHED"
            problem = ""
            reran = not first.startswith("COMPLETED")
            if reran:
                again = deployments.submit(root)
                state = deployments.wait(again, RUN_TIMEOUT_S)
                if state != "COMPLETED":
                    problem = f"the rerun {again} ended {state}"
                    deployments.down()  # nothing of this trial may reach into the next
                    deployments.up()
            got = tree_digests(root)
            got = {k: ("present" if k in volatile else v) for k, v in got.items()}
            left_after = sorted(set(got) - set(reference))
            if not problem and got != reference:
                differ = sorted(k for k in set(got) | set(reference)
                                if got.get(k) != reference.get(k))
                problem = f"outputs differ from the reference: {differ[:5]}"
            orphans = _survivors(family)
            trial = DeployTrial(i, target, round(at, 1), landed, first, reran, not problem,
                                left_after, orphans, problem)
            results.append(trial)
            if progress is not None:
                progress(trial)
            if not (trial.exact and not left_after and not orphans):
                kept = base / f"failed-trial-{i:04d}"
                shutil.rmtree(kept, ignore_errors=True)
                shutil.move(root, kept)  # kept for a look
        shutil.rmtree(root, ignore_errors=True)
        return seconds, volatile, results
    finally:
        deployments.down()


def _deploy_line(seconds: float, trials: list[DeployTrial]) -> str:
    by_target = {t: [x for x in trials if x.target == t] for t in DEPLOY_TARGETS}
    parts = [f"{t} {sum(x.landed for x in xs)}/{len(xs)}" for t, xs in by_target.items()]
    return (f"deploy   trials {len(trials):4d}  kills inside the run ({', '.join(parts)})  "
            f"exact reruns {sum(x.exact for x in trials):4d}  needed a second run "
            f"{sum(x.reran for x in trials):4d}  left behind after rerun "
            f"{sum(bool(x.left_after) for x in trials):4d}  orphan processes "
            f"{sum(bool(x.orphans) for x in trials):4d}  (reference run: {seconds:.0f} s)")


def _report_deploy(trial: DeployTrial) -> None:
    print(f"  {trial.index:4d} {trial.target:6s} at {trial.at_s:5.1f} s: "
          f"{'inside' if trial.landed else 'missed'}, killed run {trial.first_state}"
          f"{', rerun' if trial.reran else ''}: {'exact' if trial.exact else trial.problem}"
          f"{f'; left {trial.left_after}' if trial.left_after else ''}"
          f"{f'; orphans {trial.orphans}' if trial.orphans else ''}", flush=True)


def _temporary_prefect_api() -> contextlib.AbstractContextManager[None]:
    """A Prefect server for the flow scenario's children when PREFECT_API_URL is not set."""
    if os.environ.get("PREFECT_API_URL"):
        return contextlib.nullcontext()
    from flows import prefect_env

    prefect_env.configure(PREFECT_HOME=tempfile.mkdtemp(prefix="faults-prefect-"))

    @contextlib.contextmanager
    def serve():
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=None):
            os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
            try:
                yield
            finally:
                os.environ.pop("PREFECT_API_URL", None)

    return serve()


def _report_failure(trial: Trial) -> None:
    if not trial.exact or trial.left_after:
        left = f"; left {trial.left_after}" if trial.left_after else ""
        print(f"  {trial.index:4d} {trial.mode} {trial.point}: "
              f"{'exact' if trial.exact else trial.problem}{left}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per command")
    parser.add_argument("--commands", default=",".join(SCENARIOS),
                        help=f"comma-separated, of: {', '.join([*SCENARIOS, 'deploy'])} "
                        "(deploy: deployment runs through `make up`'s services; not in the "
                        "default set)")
    parser.add_argument("--port", type=int, default=DEFAULT_DEPLOY_PORT,
                        help="the Prefect server port of the deploy campaign (one of your own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where inputs and runs go (default: a temporary folder, removed)")
    args = parser.parse_args()
    names = [n.strip() for n in args.commands.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCENARIOS) - {"deploy"})
    if unknown:
        parser.error(f"unknown commands {unknown}; valid: {', '.join([*SCENARIOS, 'deploy'])}")
    print(header("benchmarks/faults.py"))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="imagenet-faults-"))
    failures = 0
    try:
        with _temporary_prefect_api() if "flow" in names else contextlib.nullcontext():
            # (the deploy campaign has `make up`'s server of its own)
            for name in names:
                started = time.monotonic()
                if name == "deploy":
                    seconds, volatile, deploy_trials = run_deploy_campaign(
                        args.trials, workdir, args.seed, port=args.port, progress=_report_deploy)
                    print(f"  compared by presence (differ between two uninterrupted runs): "
                          f"{volatile}")
                    print(f"{_deploy_line(seconds, deploy_trials)}  "
                          f"[{time.monotonic() - started:.0f} s]", flush=True)
                    failures += sum(not t.exact or bool(t.left_after) or bool(t.orphans)
                                    for t in deploy_trials)
                    continue
                campaign = run_campaign(name, args.trials, workdir, args.seed,
                                        progress=_report_failure)
                print(f"{campaign.line()}  [{time.monotonic() - started:.0f} s]", flush=True)
                failures += sum(not t.exact or bool(t.left_after) for t in campaign.trials)
    finally:
        if args.workdir is None and not failures:
            shutil.rmtree(workdir, ignore_errors=True)
        elif failures:
            print(f"failing trials kept under {workdir}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
