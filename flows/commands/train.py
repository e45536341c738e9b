"""`imagenet train --solver=S [--snapshot=X.solverstate | --weights=A.caffemodel[,B...]]
[--gpu=all|0,1|-1] [--iterations=N] [--coordinator=HOST:PORT --num_processes=N --process_id=I]`:
Caffe's `caffe train` (tools/caffe.cpp train()).

Flags keep Caffe's spellings (--solver, -solver, --gpu ...). --snapshot resumes exactly when the
snapshot has our side file (<prefix>_iter_N.resume.json) and with Caffe's semantics (data from
the first record) when it was written by real Caffe. --snapshot with --weights is refused, as in
Caffe. --iterations N stops at iteration N (snapshotting there) instead of max_iter.

Several processes (hosts) train one net when each runs this command with the same
--coordinator (process 0's HOST:PORT) and --num_processes and its own --process_id; under
SLURM's srun or Open MPI's mpirun the three come from the scheduler's environment. Each process
reads its share of every global batch from its own copy of the LMDB; process 0 logs and writes
the snapshots. The logic lives in model.train and model.distributed.

Once training runs, process 0 writes the inference bundle beside the snapshots
(`<snapshot_prefix>.inference.json` with the derived deploy net, the mean, the input scale and
the class names: model/bundle.py), so `imagenet classify --weights=<snapshot>.caffemodel IMAGE`
needs no other flag. --labels names the class names (line i = class i); without it a
labels.txt or synset_words.txt beside the LMDB (or one folder up) is used.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.errors import ImagenetError
from flows.flags import add_flag, int_at_least
from model import autotune, distributed
from model.train import PRECISIONS, TrainResult, train


def report_conv_plan_measuring() -> None:
    """Convolution plans are measured once per machine while the first step is traced
    (model/autotune.py); the commands say so on stderr rather than pause in silence."""
    autotune.configure(notify=lambda line: print(line, file=sys.stderr, flush=True))


def input_share(result: TrainResult) -> float:
    """The share of the training time (from the first step's end) the steps waited for their
    input batches: above a few percent the loader, not the device, sets the pace."""
    if result.train_seconds <= 0:
        return 0.0
    return result.input_wait_seconds / result.train_seconds


def parse_gpu(text: str | None) -> str | list[int] | None:
    """--gpu: "all", a comma-separated list of ids, or -1 for the CPU (Caffe's spelling)."""
    if text is None or text == "":
        return None
    if text.strip().lower() == "all":
        return "all"
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ImagenetError(f"--gpu={text!r}: expected 'all', a list like 0,1, or -1") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "solver", help="the solver definition protocol buffer text file")
    add_flag(parser, "snapshot", help="optional; the snapshot solver state to resume training")
    add_flag(parser, "weights", help="optional; comma-separated caffemodels to finetune from; "
             "cannot be set with --snapshot")
    add_flag(parser, "gpu", help="optional; run in data-parallel mode on these devices: 'all', "
             "'0,1', or -1 for the CPU (default: the solver's first device)")
    add_flag(parser, "iterations", type=int_at_least(1), default=None,
             help="optional; stop (and snapshot) at this iteration instead of max_iter")
    add_flag(parser, "workers", type=int_at_least(1), default=None,
             help="threads decoding input batches (default: one per core this process may "
             "use); the batches, crops and mirrors are the same for any count")
    add_flag(parser, "precision", default="fp32",
             help=f"compute precision: {', '.join(PRECISIONS)} (bf16 keeps float32 weights)")
    add_flag(parser, "coordinator", help="multi-process training: HOST:PORT of process 0 "
             "(the same in every process; default: JAX_COORDINATOR_ADDRESS, or SLURM's / Open "
             "MPI's environment, else one process)")
    add_flag(parser, "num_processes", type=int, default=None,
             help="multi-process training: how many processes (hosts) train together")
    add_flag(parser, "process_id", type=int, default=None,
             help="multi-process training: this process's id, 0 .. num_processes - 1")
    add_flag(parser, "join_timeout", type=int_at_least(1), default=distributed.JOIN_TIMEOUT_S,
             help="multi-process training: seconds to wait for every process to join before "
             "stopping with the missing ones named")
    add_flag(parser, "labels", help="optional; class names for the inference bundle, line i = "
             "class i (default: labels.txt or synset_words.txt beside the data, if any)")
    add_flag(parser, "sigint_effect", default="stop",
             help="accepted for Caffe compatibility; SIGINT/SIGTERM always snapshot, then stop")


def write_inference_bundle(solver: str, labels: str | None) -> None:
    """The bundle `imagenet classify` reads beside the snapshots (model/bundle.py). A net it
    cannot describe (no SoftmaxWithLoss, several data layers) still trains: one line says why
    there is no bundle."""
    from model.bundle import write_for_solver

    try:
        path, notes = write_for_solver(solver, labels=labels)
    except ImagenetError as err:
        print(f"imagenet train: no inference bundle for classify: {err}", file=sys.stderr)
        return
    print(f"imagenet train: inference bundle {path} (imagenet classify --weights=<snapshot> "
          "needs no other flag)", file=sys.stderr)
    for note in notes:
        print(f"imagenet train: {note}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if not args.solver:
        raise ImagenetError("Need a solver definition to train (--solver=solver.prototxt)")
    if args.snapshot and args.weights:
        raise ImagenetError("Give a snapshot to resume training or weights to finetune but "
                            "not both.")
    if args.sigint_effect not in ("stop", "snapshot", "none"):
        raise ImagenetError(f"--sigint_effect={args.sigint_effect!r}; valid: stop, snapshot, "
                            "none")
    if args.labels and not Path(args.labels).is_file():
        raise ImagenetError(f"--labels={args.labels}: no such file")
    processes = distributed.join(args.coordinator, args.num_processes, args.process_id,
                                 timeout_s=args.join_timeout)
    # The bundle is written once the first iteration ran (the inputs are good: a refused
    # command changes nothing), before this run's first snapshot.
    pending = [processes == 1 or distributed.process_index() == 0]

    def on_progress(it: int, total: int) -> None:
        if pending[0]:
            pending[0] = False
            write_inference_bundle(args.solver, args.labels)

    report_conv_plan_measuring()
    try:
        result = train(args.solver, snapshot=args.snapshot, weights=args.weights,
                       devices=parse_gpu(args.gpu), stop_at_iter=args.iterations,
                       precision=args.precision, workers=args.workers,
                       on_progress=on_progress)
    except BaseException as err:  # the other processes stop at once, naming this one's error
        distributed.report_failure(str(err).strip().splitlines()[0] if str(err).strip()
                                   else type(err).__name__)
        raise
    if processes > 1 and distributed.process_index() != 0:
        return 0  # process 0 prints the summary
    print(f"final iteration {result.final_iter}; "
          f"last snapshot {result.last_snapshot[0] if result.last_snapshot else 'none'}; "
          f"metrics {result.metrics_path}; plot {result.plot_path}; "
          f"{result.images_per_second:.1f} images/s; waiting for input "
          f"{input_share(result):.1%} of the training time")
    return 0
