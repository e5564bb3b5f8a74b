"""Screenshots of the MLflow UI as a user sees it: `segpipe ui` opened in headless Chromium.

    .venv/bin/python benchmarks/ui_screenshots.py --tracking-uri sqlite:///mlflow.db [--run-id ID] [--out ui_screenshots]

Starts ``segpipe ui`` on a free port, opens the address it prints (the model-training view of
the newest experiment) in headless Chromium driven over the DevTools protocol (MLflow's UI is a
React app: each page gets real seconds to fetch and draw its charts), and saves:

- ``runs.png``: the run list of the printed address;
- ``charts.png``: the run's "Model metrics" tab (sections ``eval``, ``perf``, ``qc``, ``train``,
  ``val``, in MLflow's alphabetical order); ``curves.png``: the same at the ``train`` section;
- ``qc_epochs.png``: that tab at the QC image cards (their slider goes through the epochs; step 0
  is the reference alone);
- ``qc_image.png``: the Artifacts tab showing the QC picture of the kept weights;
- ``progress.png``: the Artifacts tab showing the run's ``progress.png``;
- ``system.png``: the run's "System metrics" tab;
- ``model.png``: the registered model's page (when the run registered one).

Then it stops `segpipe ui` with SIGTERM and checks that nothing listens on the port any more.
The run is the newest of the store unless ``--run-id`` names one. Needs Debian's ``chromium``
(``apt-get install -y chromium``) and aiohttp (installed with MLflow) for the DevTools socket.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("ui_screenshots")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
# JavaScript run in the page: close MLflow's assistant panel (a quarter of the width)
CLOSE_ASSISTANT = """(() => { const chat = document.querySelector('button[aria-label="New Chat"]');
  const close = chat && [...chat.parentElement.querySelectorAll('button')].find(b => b.getAttribute('aria-label') === 'Close');
  if (close) close.click(); return close ? 'assistant closed' : 'no assistant'; })()"""


def scroll_to(pattern: str) -> str:
    """JavaScript scrolling the chart grid (it draws cards only once they are in view) until an
    element whose own text matches ``pattern`` (a JavaScript regex) is at the top."""
    return ("(async () => { const sleep = ms => new Promise(r => setTimeout(r, ms));"
            " const box = [...document.querySelectorAll('div')].find(e => e.scrollHeight > e.clientHeight + 50"
            " && getComputedStyle(e).overflowY !== 'visible');"
            " for (let y = 0; box && y < 20000; y += 300) { box.scrollTop = y; await sleep(300);"
            f" const hit = [...document.querySelectorAll('*')].find(e => e.children.length === 0 && /{pattern}/.test("
            "(e.innerText || '').trim()));"
            " if (hit) { hit.scrollIntoView({block: 'start'}); box.scrollTop -= 60; return 'at ' + hit.innerText; } }"
            " return 'not found'; })()")


def click_text(*names: str) -> str:
    """JavaScript clicking, in turn, the elements whose own text is each of ``names`` (the
    artifact tree: a folder, then a file)."""
    steps = " ".join(f"await click({json.dumps(n)}); await sleep(2000);" for n in names)
    return ("(async () => { const sleep = ms => new Promise(r => setTimeout(r, ms)); const click = async n => {"
            " const e = document.evaluate(`//*[normalize-space(text())='${n}']`, document, null,"
            " XPathResult.FIRST_ORDERED_NODE_TYPE, null).singleNodeValue; if (e) e.click(); return !!e; };"
            f" {steps} return 'clicked'; }})()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_ui(tracking_uri: str, port: int) -> tuple[subprocess.Popen, str]:
    """`segpipe ui` in its own session; returns the process and the address it printed."""
    cmd = [sys.executable, "-m", "pipeline", "ui", "--port", str(port), "--tracking-uri", tracking_uri]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    line = proc.stdout.readline()
    address = next((w for w in line.split() if w.startswith("http://")), f"http://127.0.0.1:{port}/")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, address
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"segpipe ui did not answer on port {port}: {line!r}")


def stop_ui(proc: subprocess.Popen, port: int) -> None:
    """SIGTERM to `segpipe ui` alone (not its group): it must take everything down itself."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    log.info("segpipe ui stopped by SIGTERM (exit %s); port %d %s", proc.returncode, port,
             "STILL LISTENING" if listening(port) else "free")


def _artifacts(tracking_uri: str, run_id: str, path: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).list_artifacts(run_id, path)


def newest_run(tracking_uri: str, run_id: str | None) -> tuple[str, str, str | None]:
    """``(experiment id, run id, registered model name)`` of ``run_id``, else of the newest run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if run_id is None:
        ids = [e.experiment_id for e in client.search_experiments()]
        run_id = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id
    run = client.get_run(run_id)
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    return run.info.experiment_id, run_id, versions[0].name if versions else None


async def screenshots(pages: list[tuple[str, str, str | None]], out: Path, chromium: str, wait_s: float,
                      size: tuple[int, int]) -> None:
    """Open each ``(name, url, script)`` in headless Chromium and save ``out/<name>.png``."""
    import aiohttp

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="segpipe-chromium-") as profile:
        proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                                 f"--remote-debugging-port={port}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            targets = []
            for _ in range(100):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                        targets = [t for t in json.load(r) if t["type"] == "page"]
                    if targets:
                        break
                except OSError:
                    await asyncio.sleep(0.2)
            async with aiohttp.ClientSession() as session, \
                    session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                counter = [0]

                async def call(method: str, **params: Any) -> dict:
                    counter[0] += 1
                    await ws.send_json({"id": counter[0], "method": method, "params": params})
                    while True:
                        msg = await ws.receive_json()
                        if msg.get("id") == counter[0]:
                            return msg.get("result", msg)

                for name, url, script in pages:
                    await call("Page.navigate", url=url)
                    await asyncio.sleep(wait_s)
                    await call("Runtime.evaluate", expression=CLOSE_ASSISTANT)
                    if script:
                        done = await call("Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True)
                        log.info("%s: %s", name, done.get("result", {}).get("value"))
                        await asyncio.sleep(wait_s / 2)
                    await asyncio.sleep(1.0)
                    shot = await call("Page.captureScreenshot", format="png")
                    (out / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
                    log.info("wrote %s (%s)", out / f"{name}.png", url)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    p.add_argument("--run-id", default=None, help="the run to show (default: the store's newest)")
    p.add_argument("--out", default="ui_screenshots", help="folder for the PNGs")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--wait", type=float, default=8.0, help="seconds each page gets to draw")
    p.add_argument("--size", type=int, nargs=2, default=[1600, 1100], metavar=("W", "H"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not Path(a.chromium).is_file():
        log.error("%s: no Chromium (Debian: apt-get install -y chromium)", a.chromium)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    exp, run_id, model = newest_run(a.tracking_uri, a.run_id)
    port = free_port()
    proc, address = start_ui(a.tracking_uri, port)
    log.info("segpipe ui printed %s", address)
    base = f"http://127.0.0.1:{port}/#/experiments/{exp}/runs/{run_id}"
    view = "?workflowType=machine_learning"
    first_qc = sorted(p.path.split("/")[-1] for p in _artifacts(a.tracking_uri, run_id, "qc"))[:1]
    pages = [("runs", address, None), ("charts", f"{base}/model-metrics{view}", None),
             ("curves", f"{base}/model-metrics{view}", scroll_to("^train$")),
             ("qc_epochs", f"{base}/model-metrics{view}", scroll_to("^qc\\/")),
             ("qc_image", f"{base}/artifacts{view}", click_text("qc", *first_qc) if first_qc else None),
             ("progress", f"{base}/artifacts{view}", click_text("progress.png")),
             ("system", f"{base}/system-metrics{view}", None)]
    if model:
        pages.append(("model", f"http://127.0.0.1:{port}/#/models/{model}{view}", None))
    try:
        asyncio.run(screenshots(pages, out, a.chromium, a.wait, tuple(a.size)))
    finally:
        stop_ui(proc, port)
    return 1 if listening(port) else 0


if __name__ == "__main__":
    raise SystemExit(main())
