"""MLflow tracking against a real store and a real ``mlflow server`` on 127.0.0.1: a training
logs there; a server that stops mid-run does not stop training and the records stay local; a
server that comes back gets them replayed."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoints import list_checkpoints
from pipeline.errors import UsageError
from pipeline.tracking import RunTracker, serve_ui, server_command
from pipeline.train import train_bundle

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "phantom_ct_3d"
FAST = {"pixdim": [1.6, 1.6, 2.5], "roi_size": [16, 16, 12], "network_def#features": [8, 16, 32, 8],
        "num_workers": 0, "num_folds": 3, "batch_size": 2, "num_samples": 1, "val_interval": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], port: int, cwd: Path) -> subprocess.Popen:
    """Start a server in its own process group and wait for MLflow's /health."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    _stop(proc)
    raise RuntimeError(f"mlflow server on port {port} did not start")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started: its own process group (server and workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def data(ct6_dataset: Path) -> Path:
    return ct6_dataset


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the servers of this module (MLflow creates its tables once)."""
    return tmp_path_factory.mktemp("store") / "mlflow.db"


@pytest.fixture(scope="module")
def ui_server(store: Path) -> Iterator[str]:
    """`segpipe ui` itself, on a free port, serving the module's SQLite store."""
    port = _free_port()
    proc = _start([sys.executable, "-m", "pipeline", "ui", "--port", str(port), "--tracking-uri", f"sqlite:///{store}"],
                  port, store.parent)
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


def test_tracker_journals_every_record_and_logs_to_a_store(tmp_path: Path, store: Path) -> None:
    uri = f"sqlite:///{store}"
    t = RunTracker(uri, "exp", tmp_path / "metrics.jsonl")
    t.log_params({"lr": 0.01, "roi": [16, 16, 12]})
    t.set_tags({"bundle": "x"})
    t.log_metrics({"train_loss": 1.5}, step=1)
    t.log_metrics({"train_loss": 1.0}, step=2)
    (tmp_path / "a.csv").write_text("case,dice\n")
    t.log_artifact(tmp_path / "a.csv", "validation")
    info = t.finish()
    assert info["tracking_ok"] and info["mlflow_run_id"]
    client = MlflowClient(uri)
    run = client.get_run(info["mlflow_run_id"])
    assert run.data.params == {"lr": "0.01", "roi": "[16, 16, 12]"} and run.data.tags["bundle"] == "x"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1.5, 1.0]
    assert [f.path for f in client.list_artifacts(run.info.run_id, "validation")] == ["validation/a.csv"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["param", "param", "tag", "metric", "metric", "artifact"]


def test_unreachable_server_warns_once_and_keeps_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        t = RunTracker(f"http://127.0.0.1:{_free_port()}", "exp", tmp_path / "metrics.jsonl")
        for step in range(5):
            t.log_metrics({"train_loss": 1.0 / (step + 1)}, step=step)
            t.flush()
        info = t.finish()
    assert time.monotonic() - t0 < 30  # no minutes of HTTP retries
    assert not info["tracking_ok"] and info["metrics_jsonl"] == str(tmp_path / "metrics.jsonl")
    assert sum("failed" in r.message for r in caplog.records) == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


def test_training_logs_to_a_real_mlflow_server(tmp_path: Path, data: Path, ui_server: str) -> None:
    s = train_bundle(BUNDLE, manifest=data, epochs=2, tracking_uri=ui_server,
                     overrides={**FAST, "output_dir": str(tmp_path / "run")})
    assert s["tracking_ok"] and s["tracking_uri"] == ui_server
    client = MlflowClient(ui_server)
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["network"] == "unet"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_mean_dice")} == {1, 2}
    assert "val_dice_kidney" in run.data.metrics and "data_wait_fraction" in run.data.metrics
    assert [f.path for f in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]


@pytest.mark.slow  # a second mlflow server and a training subprocess
def test_server_stopped_mid_run_does_not_stop_training(tmp_path: Path, data: Path, store: Path, ui_server: str) -> None:
    port = _free_port()
    server = _start(server_command("127.0.0.1", port, f"sqlite:///{store}", tmp_path / "art"), port, tmp_path)
    out = tmp_path / "run"
    sets = [a for k, v in {**FAST, "output_dir": str(out)}.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    try:
        train = subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(BUNDLE), "--manifest", str(data),
                                  "--epochs", "3", "--tracking-uri", f"http://127.0.0.1:{port}", *sets],
                                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not list_checkpoints(out / "checkpoints") and train.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        _stop(server)  # mid-run
    stdout, stderr = train.communicate(timeout=300)
    assert train.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout[stdout.index("{\n"):])
    assert summary["epochs"] == 3 and not summary["tracking_ok"]
    assert stderr.count("MLflow tracking at") == 1  # warned once
    records = [json.loads(line) for line in Path(summary["metrics_jsonl"]).read_text().splitlines()]
    assert {r["step"] for r in records if r.get("key") == "val_mean_dice"} == {1, 2, 3}


@pytest.mark.slow  # a second mlflow server
def test_records_are_replayed_when_the_server_comes_back(tmp_path: Path, store: Path, ui_server: str) -> None:
    port = _free_port()
    t = RunTracker(f"http://127.0.0.1:{port}", "exp", tmp_path / "metrics.jsonl")  # no server yet
    t.log_params({"lr": 0.01})
    for step in (1, 2):
        t.log_metrics({"train_loss": 1.0 / step}, step=step)
        t.flush()
    assert t.offline and t.run_id is None
    server = _start(server_command("127.0.0.1", port, f"sqlite:///{store}", tmp_path / "art"), port, tmp_path)
    try:
        info = t.finish()
        assert info["tracking_ok"] and info["mlflow_run_id"]
        client = MlflowClient(f"http://127.0.0.1:{port}")
        assert [m.step for m in client.get_metric_history(info["mlflow_run_id"], "train_loss")] == [1, 2]
        run = client.get_run(info["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.01"}
    finally:
        _stop(server)


def test_ui_refuses_a_server_uri_and_binds_localhost_by_default() -> None:
    with pytest.raises(UsageError, match="already a server"):
        serve_ui(tracking_uri="http://127.0.0.1:5000")
    assert server_command("127.0.0.1", 5000, "sqlite:///x.db")[4:8] == ["--host", "127.0.0.1", "--port", "5000"]
