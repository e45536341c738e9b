"""The kill campaign (benchmarks/faults.py, loaded by path) at its test size: convert-imageset,
extract, train and the flow's convert stage, each SIGKILLed at seeded instants inside its work
(stepped with SIGSTOP/SIGCONT, or the moment a chosen file appears: between the files of one
snapshot, right after a DB or a synset is renamed into place), then rerun. Every rerun must
give the uninterrupted run's outputs byte for byte and leave nothing behind.

`python benchmarks/faults.py --trials N` runs the long campaign and prints the counts.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "imagenet_faults", Path(__file__).resolve().parents[2] / "benchmarks" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = faults  # its dataclasses look their module up by name
_spec.loader.exec_module(faults)

SEED = 12
# (mode, point) per trial; None points are drawn from the seeded generator. The counts keep
# this file near 60 s of `make test` on 2 busy cores (the flow's share is mostly Prefect).
PLANS: dict[str, list[tuple[str, str | None]]] = {
    "convert": [("step", None), ("file", "db/data.mdb"), ("step", None)],
    "extract": [("step", None), ("file", "root/train/n01440765"), ("step", None)],
    # A kill once the side file of snapshot 4 is in place, before its caffemodel and
    # solverstate (tests/model/test_train_snapshot.py stops after each rename in-process).
    "train": [("file", "tiny_iter_4.resume.json")],
    # Right after the train LMDB is renamed into place, before its manifest is written.
    "flow": [("file", "lmdb/ilsvrc12_train_lmdb/data.mdb")],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PLANS))
def test_killed_and_rerun_gives_the_uninterrupted_outputs(name, tmp_path, request):
    extra_env = {}
    if name == "flow":
        request.getfixturevalue("prefect_harness")
        from prefect.settings import PREFECT_API_URL

        extra_env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    plans = PLANS[name]
    campaign = faults.run_campaign(name, len(plans), tmp_path, SEED, plans=plans,
                                   extra_env=extra_env)
    print(campaign.line())
    for trial in campaign.trials:
        assert trial.exact, f"trial {trial.index} ({trial.mode} {trial.point}): {trial.problem}"
        assert not trial.left_after, f"trial {trial.index} left {trial.left_after}"
    # The kills hit running work (a kill after the process exited would prove nothing): a
    # file appears while its writer still runs; a stepped run may, rarely, end first.
    assert all(t.landed for t in campaign.trials if t.mode == "file")
    assert sum(t.landed for t in campaign.trials) >= max(1, len(plans) - 1)
    assert campaign.reference_steps > 0
