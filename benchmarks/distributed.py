"""Data-parallel training throughput on one host: 1 process against N processes joined by
jax.distributed (model/distributed.py), at the same global batch, on bvlc_alexnet.

Usage: python benchmarks/distributed.py [--batch-size 32] [--processes 2] [--iterations 6]
       [--rounds 3] [--records N]

Each round runs, in fresh processes and in this order, the real trainer (model.train.train on
bvlc_alexnet's train_val, its TRAIN Data layer reading an LMDB of random 256x256 images built
in a temp dir, crop 227 + mirror + mean file; no test nets):
  baseline   1 process, 1 device, batch_size x N per step
  devices    1 process, N host devices (--xla_force_host_platform_device_count), batch_size each
  processes  N processes of 1 device, batch_size each, gloo over 127.0.0.1
  pinned     the same, each process pinned to its own share of the CPUs (pin_cpus)
img/s is the Solver's own figure (images after the first, compiling, step over their time).
Printed: the CPU model and ISA flags, the load average, every run, and per configuration the
median img/s and the median of its per-round ratio to the baseline of the same round. The LAST
line is `distributed img/s: baseline X, devices Y, processes Z, pinned W (ratios ...)`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo on sys.path)

from model import distributed  # noqa: E402

CONFIGS = ("baseline", "devices", "processes", "pinned")
SOLVER = """net: "train_val.prototxt"
base_lr: 0.01
lr_policy: "fixed"
momentum: 0.9
weight_decay: 0.0005
display: 0
max_iter: {max_iter}
snapshot: 0
snapshot_after_train: false
solver_mode: CPU
random_seed: 1
"""
# One process of `baseline` / `devices`: train, print the Solver's img/s.
ONE_PROCESS = r"""
import json, sys
from model.train import train
r = train("solver.prototxt", workdir=sys.argv[1], devices=sys.argv[2], log=lambda l: None)
print(json.dumps({"img_per_s": r.images_per_second}))
"""


def write_run_dir(folder: Path, net: Path, data: common.BenchData, batch: int,
                  max_iter: int) -> Path:
    """solver.prototxt + train_val.prototxt (TRAIN Data layer on the bench LMDB, at `batch`
    per device; no test nets) in `folder`."""
    from google.protobuf import text_format

    from model.prototxt import read_net_parameter

    param = read_net_parameter(net)
    for lp in param.layer:
        if lp.type == "Data":
            lp.data_param.source = str(data.lmdb)
            lp.data_param.batch_size = batch
            lp.transform_param.mean_file = str(data.mean_file)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_val.prototxt").write_text(text_format.MessageToString(param))
    (folder / "solver.prototxt").write_text(SOLVER.format(max_iter=max_iter))
    return folder


def run_one_process(folder: Path, devices: str, host_devices: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(common.REPO))
    if host_devices > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={host_devices}").strip()
    out = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(folder), devices], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{folder.name}: exit {out.returncode}: {out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["img_per_s"])


def run_processes(folder: Path, processes: int, pin: bool) -> float:
    env = dict(os.environ, PYTHONPATH=str(common.REPO))
    result = distributed.run_local_processes(processes, "solver.prototxt", workdir=folder,
                                             env=env, pin_cpus=pin)
    return float(result.images_per_second)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32, help="per device (process)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--iterations", type=int, default=6, help="timed iterations (after one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--records", type=int, default=0,
                   help="LMDB records (default: two global batches)")
    args = p.parse_args()
    n, b = args.processes, args.batch_size
    print(common.header("benchmarks/distributed.py"))
    print(f"bvlc_alexnet, global batch {n * b} ({n} x {b}), {args.iterations} timed "
          f"iterations after the first, {args.rounds} rounds", flush=True)
    max_iter = args.iterations + 1
    runs: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        root = Path(tmp)
        data = common.build_lmdb(root / "data", args.records or 2 * n * b)
        net = common.ALEXNET_TRAIN_VAL
        dirs = {"baseline": write_run_dir(root / "baseline", net, data, n * b, max_iter)}
        for c in CONFIGS[1:]:
            dirs[c] = write_run_dir(root / c, net, data, b, max_iter)
        for r in range(args.rounds):
            got = {"baseline": run_one_process(dirs["baseline"], "0", 1),
                   "devices": run_one_process(dirs["devices"], "all", n),
                   "processes": run_processes(dirs["processes"], n, pin=False),
                   "pinned": run_processes(dirs["pinned"], n, pin=True)}
            for c, v in got.items():
                runs[c].append(v)
            print(f"round {r + 1}: " + ", ".join(f"{c} {v:.2f}" for c, v in got.items())
                  + f" img/s; load {os.getloadavg()[0]:.2f}", flush=True)
    ratios = {c: statistics.median(v / base for v, base in zip(runs[c], runs["baseline"]))
              for c in CONFIGS}
    med = {c: statistics.median(v) for c, v in runs.items()}
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("distributed img/s: " + ", ".join(f"{c} {med[c]:.2f}" for c in CONFIGS)
          + " (median ratio to baseline: "
          + ", ".join(f"{c} {ratios[c]:.2f}" for c in CONFIGS[1:]) + ")")


if __name__ == "__main__":
    main()
