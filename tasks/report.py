"""What a pipeline run leaves in the Prefect UI and on the terminal: the test-metrics table
artifact, the markdown summary (per stage ran/cached and why, duration, throughput; dataset
counts; final top-1/top-5; output paths; the training curve as an embedded PNG), the plain-text
per-stage table that `imagenet pipeline` and `make demo` print, and the flow's last log line.

Numbers are shown at 4 significant digits (model.plot.sig) (a float32 accuracy of 0.045 is stored as
0.044999998062849045). The curve is model/plot.py's, the same plotter as the trainer's
`<prefix>_plot.png`.
"""
from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any, Sequence

from model.plot import curve_png, sig
from tasks.stage import StageRun

# The event that carries the final line: `prefect deployment run --watch` prints a run's events
# (and its logs only where the server streams them out, which Prefect's default settings do
# not), each as "<event> * <resource name>", so the name is the line itself.
RESULT_EVENT = "imagenet.pipeline.finished"
FAILED_EVENT = "imagenet.pipeline.failed"        # the one-line cause, as the state message
CANCELLED_EVENT = "imagenet.pipeline.cancelled"  # where training stopped
RESULT_RESOURCE = "imagenet.pipeline.result.{flow_run_id}"
EVENT_FLUSH_TIMEOUT_S = 10
ARTIFACT_KEY_METRICS = "imagenet-test-metrics"
ARTIFACT_KEY_SUMMARY = "imagenet-summary"
CURVE_FILE = "curve.png"
SHORT_WHY = 100  # characters of a cause in the summary's stage table (the headline has it all)


def rounded_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with every float at 4 significant digits (for table artifacts)."""
    return [{k: (float(sig(v)) if isinstance(v, float) else v) for k, v in row.items()}
            for row in rows]


def render_curve(rows: Sequence[dict[str, Any]], path: Path | str) -> Path | None:
    """The training curve (model/plot.py, the plotter of `<prefix>_plot.png` too) written to
    `path`; None when there is nothing to draw."""
    png = curve_png(rows)
    if png is None:
        return None
    path = Path(path)
    path.write_bytes(png)
    return path


def png_data_url(path: Path | str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def stage_table_rows(runs: Sequence[StageRun]) -> list[dict[str, str]]:
    out = []
    for run in runs:
        r = run.result
        out.append({
            "stage": run.name,
            "status": run.status,
            "why": run.why or "-",
            "this run (s)": f"{run.wall_seconds:.1f}",
            "work (s)": f"{r.seconds:.1f}",
            "throughput": r.throughput or "-",
        })
    return out


def format_text_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table for the terminal."""
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    rule = "  ".join("-" * widths[c] for c in cols)
    body = ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join([line, rule, *body])


def _md_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "_none_\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(sig(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def final_line(final: dict[str, Any] | None, weights: str | None, *, data_root: str) -> str:
    """The flow's last log line: top-1/top-5 and the final weights, or what was done."""
    if not final:
        return f"pipeline finished (no evaluation in this run); data root {data_root}"
    t1, t5 = final.get("top1"), final.get("top5")
    return (f"pipeline finished: top-1 = {sig(t1) if t1 is not None else 'n/a'}, "
            f"top-5 = {sig(t5) if t5 is not None else 'n/a'} on the val LMDB; "
            f"final weights {weights}")


def announce(line: str, payload: dict[str, Any], event: str = RESULT_EVENT) -> None:
    """Emit `event` about the current flow run, named `line`, with `payload` (top-1, top-5,
    weights; or the failure: what an automation would trigger on), and send it now: the
    watcher stops listening for events at the run's final state, and would otherwise show a
    failed run as just "Failed"."""
    from prefect.context import FlowRunContext
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    run_id = str(ctx.flow_run.id)
    emit_event(event=event,
               resource={"prefect.resource.id": RESULT_RESOURCE.format(flow_run_id=run_id),
                         "prefect.resource.name": line},
               related=[{"prefect.resource.id": f"prefect.flow-run.{run_id}",
                         "prefect.resource.role": "flow-run"}],
               payload=payload)
    # Sent before the flow returns (and the run reaches its final state); never wait forever
    # on a server that went away.
    flush = threading.Thread(target=EventsWorker.instance().wait_until_empty, daemon=True)
    flush.start()
    flush.join(EVENT_FLUSH_TIMEOUT_S)


def summary_markdown(
    runs: Sequence[StageRun],
    *,
    data_root: str,
    datasets: dict[str, dict[str, Any]],
    final: dict[str, Any] | None,
    outputs: dict[str, str],
    curve: Path | None,
    notes: Sequence[str] = (),
) -> str:
    """The end-of-run summary artifact; `notes`: what the listings stage found and did not use
    (empty class folders, stray files, ...)."""
    parts = ["# imagenet pipeline summary\n", f"Data root: `{data_root}`\n", "## Stages\n",
             _md_table(stage_table_rows(runs))]
    if datasets:
        parts += ["\n## Datasets\n", _md_table([{"set": k, **v} for k, v in datasets.items()])]
    if notes:
        parts += ["\n## Notes on the data\n", *[f"- {note}\n" for note in notes]]
    if final:
        t1, t5 = final.get("top1"), final.get("top5")
        parts += ["\n## Final accuracy (val LMDB)\n",
                  f"- top-1: **{sig(t1)}**\n" if t1 is not None else "- top-1: n/a\n",
                  f"- top-5: **{sig(t5)}**\n" if t5 is not None else "- top-5: n/a\n"]
    if outputs:
        parts += ["\n## Outputs\n", *[f"- {k}: `{v}`\n" for k, v in outputs.items()]]
    if curve is not None:
        parts += ["\n## Training curve\n",
                  "The training loss of sampled iterations' batches and the test outputs at "
                  "each test interval, against the iteration.\n\n",
                  f"![training curve]({png_data_url(curve)})\n"]
    return "".join(parts)


def _short(text: str, limit: int = SHORT_WHY) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def stopped_summary_markdown(
    runs: Sequence[StageRun],
    *,
    state: str,
    message: str,
    stage: str | None,
    stopped: Sequence[tuple[str, str]],
    not_reached: Sequence[str],
    data_root: str,
    changes: Sequence[str] = (),
    rerun: str = "",
    failed: Sequence[tuple[str, str]] = (),
) -> str:
    """The summary artifact of a run that ended Failed or Cancelled: what ran (and what came
    from the cache), which stage stopped and why (the headline), the other stages that failed
    or were stopped beside it, and what a rerun does."""
    rows = stage_table_rows(runs)
    dash = {"this run (s)": "-", "work (s)": "-", "throughput": "-"}
    if stage:
        rows.append({"stage": stage, "status": state.lower(), "why": "the message above", **dash})
    for name, why in failed:
        rows.append({"stage": name, "status": "failed", "why": _short(why), **dash})
    for name, _ in stopped:
        rows.append({"stage": name, "status": "cancelled",
                     "why": f"stopped when {stage} {state.lower()}" if stage else "stopped",
                     **dash})
    parts = [f"# imagenet pipeline summary: {state}\n", f"Data root: `{data_root}`\n\n",
             f"**{message}**\n", "\n## Stages\n", _md_table(rows)]
    if changes:
        parts += ["\n## Changed in this run\n", *[f"- {c}\n" for c in changes]]
    finished = [run.name for run in runs]
    again = ([stage] if stage else []) + [n for n, _ in failed] + [n for n, _ in stopped]
    parts.append("\n## What a rerun does\n")
    if finished:
        parts.append(f"- reuses what finished (cached): {', '.join(finished)}\n")
    if rerun:
        parts.append(f"- {rerun}\n")
    elif again:
        parts.append(f"- runs again: {', '.join(again)}"
                     + (" (once the cause above is fixed)\n" if state == "Failed" else "\n"))
    if not_reached:
        parts.append(f"- then the stages this run did not reach: {', '.join(not_reached)}\n")
    return "".join(parts)
