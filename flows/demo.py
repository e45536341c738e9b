"""`make demo`: the whole `imagenet` flow on a mini ILSVRC12 mirror, on CPU, in a few minutes.

1. Build the mini mirror (data.mini: real ILSVRC2012 layout and archive names, 10 classes) under
   demo-data/mirror, once.
2. Serve it over HTTP on 127.0.0.1 from a background thread (stopped when the demo ends), so the
   download stage does real HTTP, with resume and md5 checks against the mirror's MD5SUMS.
3. Run the flow: download, extract, listings, convert (64x64 LMDBs), mean, train the small zoo
   net for a few hundred iterations, evaluate on the val LMDB.
4. Print the per-stage table and, last, `demo finished: top-1 = ..., top-5 = ... (chance ...)`.

Everything lands in demo-data/ (git-ignored); a second `make demo` finds every stage cached.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flows import prefect_env

DEMO_DIR = prefect_env.PROJECT_ROOT / "demo-data"
DEMO_CLASSES = 10
DEMO_TRAIN_PER_CLASS = 100
DEMO_VAL_PER_CLASS = 20
DEMO_SEED = 0
DEMO_RESIZE = 64  # the mini classes are learnable at 64x64 (data/mini.py)
DEMO_SOLVER = "model/zoo/alexnet_mini/solver.prototxt"
# The mirror is rebuilt when any of these change; recorded next to it.
MIRROR_STAMP = "mirror.json"
RESULT_DECIMALS = 3


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # the flow logs downloads itself
        pass


class MirrorServer:
    """A static HTTP server for `folder` on 127.0.0.1 (a free port), in a daemon thread."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "MirrorServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def build_mirror(folder: Path, classes: int, train_per_class: int, val_per_class: int,
                 seed: int, **options: Any) -> Path:
    """The mini ILSVRC12 archives (built once per configuration; reused after). `options` go
    to make_mini_ilsvrc12 as they are (profile, train_counts, progress) and, except progress,
    into the configuration."""
    from data.mini import make_mini_ilsvrc12

    wanted = {"classes": classes, "train_per_class": train_per_class,
              "val_per_class": val_per_class, "seed": seed,
              **{k: v for k, v in options.items() if k != "progress"}}
    stamp = folder / MIRROR_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and (folder / "MD5SUMS").is_file():
        print(f"mini ILSVRC12 mirror: reusing {folder}")
        return folder
    print(f"mini ILSVRC12 mirror: building {classes} classes x ({train_per_class} train + "
          f"{val_per_class} val) in {folder}")
    make_mini_ilsvrc12(folder, classes=classes, train_per_class=train_per_class,
                       val_per_class=val_per_class, seed=seed, **options)
    stamp.write_text(json.dumps(wanted))
    return folder


def _stop_ephemeral_server() -> None:
    """Stop the temporary Prefect server now rather than at exit, where its shutdown messages
    (and, on a fresh database, a harmless sqlalchemy traceback) would follow the result line,
    which must be the last one."""
    logging.getLogger("prefect").setLevel(logging.WARNING)
    try:
        from prefect.logging.handlers import APILogHandler
        from prefect.server.api.server import SubprocessASGIServer

        # Send the flow's last log lines while the server is still up (flush is an instance
        # method in prefect 3.9; a fresh handler drains the shared APILogWorker).
        APILogHandler().flush()
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    except Exception as err:  # only cosmetics depend on it
        print(f"(could not stop the temporary Prefect server early: {err})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=DEMO_DIR, help="where the demo's data lives")
    parser.add_argument("--classes", type=int, default=DEMO_CLASSES)
    parser.add_argument("--train-per-class", type=int, default=DEMO_TRAIN_PER_CLASS)
    parser.add_argument("--val-per-class", type=int, default=DEMO_VAL_PER_CLASS)
    parser.add_argument("--resize", type=int, default=DEMO_RESIZE)
    parser.add_argument("--solver", default=DEMO_SOLVER)
    parser.add_argument("--max-iter", type=int, default=None, help="override the solver's")
    args = parser.parse_args(argv)

    start = time.monotonic()
    prefect_env.configure()
    mirror = build_mirror(args.dir / "mirror", args.classes, args.train_per_class,
                          args.val_per_class, DEMO_SEED)
    from flows.imagenet import PipelineParams, Sources, imagenet
    from tasks.report import format_text_table

    with MirrorServer(mirror) as server:
        print(f"serving the mirror at {server.url}")
        params = PipelineParams(
            sources=Sources(train=f"{server.url}/ILSVRC2012_img_train.tar",
                            val=f"{server.url}/ILSVRC2012_img_val.tar",
                            aux=f"{server.url}/caffe_ilsvrc12.tar.gz",
                            checksums=f"{server.url}/MD5SUMS"),
            data_root=str(args.dir / "root"),
            resize_height=args.resize, resize_width=args.resize,
            solver=args.solver, max_iter=args.max_iter,
        )
        state = imagenet(**params.flow_parameters(), return_state=True)

    _stop_ephemeral_server()
    if not state.is_completed():
        print(f"demo failed: {state.message or state.name}", file=sys.stderr)
        return 1
    result = state.result()
    print()
    print(format_text_table(result["stages"]))
    print(f"\ndemo took {time.monotonic() - start:.0f} s; data under {args.dir}")
    top1, top5 = result.get("top1"), result.get("top5")
    if top1 is None or top5 is None:
        print("demo finished without top-1/top-5 (the net has no top-1 and top-5 Accuracy layers)")
        return 1
    # Three decimals: the mini val set has 200 images, so 0.995 (one miss) must not read 1.00.
    print(f"demo finished: top-1 = {top1:.{RESULT_DECIMALS}f}, top-5 = {top5:.{RESULT_DECIMALS}f} "
          f"(chance {1.0 / args.classes:.{RESULT_DECIMALS}f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
