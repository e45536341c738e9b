"""`make screenshots`: the README's pictures of the Prefect UI, taken from a real headless Chromium.

Against a running `make up` server whose newest imagenet/mini-pipeline run completed, it saves
    docs/images/flow-run-graph.png       the flow run's page: the task-run graph with its edges
    docs/images/summary-artifact.png     the imagenet-summary artifact (stage table, curve)
and, where the server has them, of the newest cancelled and failed imagenet runs:
    docs/images/cancelled-run.png        its page (Cancelled, the graph up to where it stopped)
    docs/images/cancelled-summary.png    its imagenet-summary (what ran, what a rerun does)
    docs/images/failed-summary.png       the failed run's imagenet-summary (cause, rerun)
each at most MAX_PNG_BYTES (quantized to a palette when larger). A developer tool: not part of
`make test`, not a runtime dependency. It needs Debian's Chromium (`apt-get install -y
chromium`) and drives it over the DevTools protocol (a websocket; the `websockets` package comes
with Prefect).

    .venv/bin/python docs/screenshots.py [--api http://127.0.0.1:4200/api] [--out docs/images]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

DEFAULT_API = "http://127.0.0.1:4200/api"
OUT_DIR = Path(__file__).resolve().parent / "images"
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags this machine's Chromium refused connections.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
VIEWPORT = (1440, 1000)
MAX_PAGE_HEIGHT = 4000
DEPLOYMENT = "mini-pipeline"
FLOW = "imagenet"
# The stopped runs pictured, when the server has one: (state type, file name stem, its page too).
STOPPED = (("CANCELLED", "cancelled", True), ("FAILED", "failed", False))
SUMMARY_KEY = "imagenet-summary"
MAX_PNG_BYTES = 300_000
PALETTE_COLOURS = 128
START_TIMEOUT_S = 30
PAGE_TIMEOUT_S = 60
SETTLE_S = 3.0  # after the page reports what we wait for: charts animate in
POLL_S = 0.5


def newest_run(api: httpx.Client) -> dict:
    """The newest Completed run of imagenet/mini-pipeline."""
    deployments = api.post("/deployments/filter", json={
        "deployments": {"name": {"any_": [DEPLOYMENT]}}}).json()
    if not deployments:
        sys.exit(f"no deployment {DEPLOYMENT!r} on {api.base_url}: run `make up` first")
    runs = api.post("/flow_runs/filter", json={
        "deployments": {"id": {"any_": [deployments[0]["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        "sort": "START_TIME_DESC", "limit": 1}).json()
    if not runs:
        sys.exit("no completed imagenet/mini-pipeline run: run "
                 "`.venv/bin/prefect deployment run imagenet/mini-pipeline --watch` first")
    return runs[0]


def newest_in_state(api: httpx.Client, state_type: str) -> dict | None:
    """The newest run of the imagenet flow (any deployment) that ended in `state_type`."""
    runs = api.post("/flow_runs/filter", json={
        "flows": {"name": {"any_": [FLOW]}},
        "flow_runs": {"state": {"type": {"any_": [state_type]}}},
        "sort": "START_TIME_DESC", "limit": 1}).json()
    return runs[0] if runs else None


def summary_artifact(api: httpx.Client, flow_run_id: str) -> dict:
    found = api.post("/artifacts/filter", json={"artifacts": {
        "flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": [SUMMARY_KEY]}}}).json()
    if not found:
        sys.exit(f"flow run {flow_run_id} has no {SUMMARY_KEY} artifact")
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self) -> None:
        if not Path(CHROMIUM).exists():
            sys.exit(f"{CHROMIUM} not found: apt-get install -y chromium")
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="imagenet-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--remote-debugging-port={self.port}",
             f"--user-data-dir={self.profile}", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ws = None
        self._next_id = 0

    async def __aenter__(self) -> "Browser":
        import websockets

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{self.port}/json/list").json()
                page = next(t for t in targets if t["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration):
                if time.monotonic() > deadline:
                    raise RuntimeError("Chromium did not start its DevTools endpoint")
                await asyncio.sleep(POLL_S)
        self.ws = await websockets.connect(page["webSocketDebuggerUrl"], max_size=2**28)
        await self.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0],
                        height=VIEWPORT[1], deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, method: str, **params: object) -> dict:
        self._next_id += 1
        await self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def show(self, url: str, ready_js: str) -> None:
        """Navigate and wait until `ready_js` (an expression) is true, then let it settle."""
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while True:
            result = await self.call("Runtime.evaluate", expression=ready_js, returnByValue=True)
            if result.get("result", {}).get("value") is True:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: not ready after {PAGE_TIMEOUT_S} s ({ready_js})")
            await asyncio.sleep(POLL_S)
        await asyncio.sleep(SETTLE_S)

    async def screenshot(self, path: Path, full_page: bool = False) -> int:
        """The viewport; with `full_page`, the viewport grown to the tallest scrolling content
        (the UI scrolls inside a panel, not the document)."""
        if full_page:
            size = await self.call("Runtime.evaluate", returnByValue=True, expression=(
                "Math.max(...Array.from(document.querySelectorAll('*'), e => e.scrollHeight))"))
            height = min(int(size["result"]["value"]), MAX_PAGE_HEIGHT)
            await self.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0],
                            height=height, deviceScaleFactor=1, mobile=False)
            await asyncio.sleep(SETTLE_S)
        shot = await self.call("Page.captureScreenshot", format="png")
        if full_page:
            await self.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0],
                            height=VIEWPORT[1], deviceScaleFactor=1, mobile=False)
        return save_png(base64.b64decode(shot["data"]), path)


def save_png(data: bytes, path: Path) -> int:
    """Write the PNG, quantized to a palette when it is over MAX_PNG_BYTES; its size."""
    if len(data) > MAX_PNG_BYTES:
        image = Image.open(io.BytesIO(data)).convert("RGB").quantize(PALETTE_COLOURS)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
    if len(data) > MAX_PNG_BYTES:
        raise RuntimeError(f"{path.name}: {len(data)} bytes even as a palette PNG "
                           f"(limit {MAX_PNG_BYTES})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


async def take(api_url: str, out: Path) -> None:
    ui = api_url.removesuffix("/api")
    with httpx.Client(base_url=api_url, timeout=30) as api:
        run = newest_run(api)
        artifact = summary_artifact(api, run["id"])
        stopped = [(stem, page, found, summary_artifact(api, found["id"]))
                   for state, stem, page in STOPPED if (found := newest_in_state(api, state))]
    # What the pages show once rendered: the graph's canvas; the artifact's markdown table.
    graph_ready = "document.querySelectorAll('canvas').length > 0"
    summary_ready = "document.querySelectorAll('table').length > 0 && " \
                    "Array.from(document.images).every(i => i.complete)"
    async with Browser() as browser:
        await browser.show(f"{ui}/runs/flow-run/{run['id']}", graph_ready)
        size = await browser.screenshot(out / "flow-run-graph.png")
        print(f"{out / 'flow-run-graph.png'}: {size} bytes (flow run {run['name']})")
        await browser.show(f"{ui}/artifacts/artifact/{artifact['id']}", summary_ready)
        size = await browser.screenshot(out / "summary-artifact.png", full_page=True)
        print(f"{out / 'summary-artifact.png'}: {size} bytes")
        for stem, page, found, summary in stopped:
            if page:
                await browser.show(f"{ui}/runs/flow-run/{found['id']}", graph_ready)
                size = await browser.screenshot(out / f"{stem}-run.png")
                print(f"{out / f'{stem}-run.png'}: {size} bytes (flow run {found['name']})")
            await browser.show(f"{ui}/artifacts/artifact/{summary['id']}", summary_ready)
            size = await browser.screenshot(out / f"{stem}-summary.png", full_page=True)
            print(f"{out / f'{stem}-summary.png'}: {size} bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="docs/screenshots.py", description=__doc__.split("\n")[0])
    parser.add_argument("--api", default=DEFAULT_API, help="the Prefect API of `make up`")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the PNGs go")
    args = parser.parse_args(argv)
    asyncio.run(take(args.api, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
