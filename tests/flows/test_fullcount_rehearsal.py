"""benchmarks/fullcount.py at --scale 0.001 (1000 classes, 1,000 + 1,000 16x16 images), so the
full-count rehearsal does not rot: it builds its set, serves it over HTTP, runs every stage, a
cached rerun, the copied and moved data root reruns and one with every output touched, passes every check and ends with its
one summary line. The full count itself (`python benchmarks/fullcount.py`) takes about an hour
and is not part of the suite."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 540
LAST_LINE = re.compile(r"^fullcount: 2,000 images, data stages [0-9.]+ min, peak memory [0-9,]+ "
                       r"MiB, cached rerun [0-9.]+ s$")


def test_fullcount_rehearsal_at_a_thousandth(tmp_path):
    # Its own Prefect (the child sets PREFECT_HOME under --work), not the test session's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fullcount.py"), "--scale",
                          "0.001", "--work", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert "FAIL" not in out
    for check in ("train LMDB: every label 0..999 present", "val LMDB: keys %08d_<path> in the "
                  "seeded shuffle's order", "= `imagenet compute-image-mean`'s output byte for "
                  "byte", "copied root (cp -a): every stage Cached", "moved root (mv): the same "
                  "counts, digests and scores as the first run", "touched outputs (re-verified "
                  "by content): every stage Cached"):
        assert any(line.strip().startswith("ok") and check in line
                   for line in out.splitlines()), check
    assert LAST_LINE.match(out.strip().splitlines()[-1]), out.strip().splitlines()[-1]
    # The data root and its copies are gone (the mirror stays, for a rerun to reuse).
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["mirror"]
