"""MLflow tracking that never loses a training run, and the MLflow UI.

One MLflow run per training, in an experiment named after the bundle. The tracking URI is the
``--tracking-uri`` argument, else ``MLFLOW_TRACKING_URI``, else MLflow's default
(``sqlite:///mlflow.db`` in the working folder, which ``segpipe ui`` there reads).

Every record (param, tag, metric, artifact) is appended to a local JSONL file first and sent to
MLflow in batches. If MLflow fails (server down, network), training goes on: one warning, the
tracker stops calling MLflow, and at ``finish`` it tries once more to send what is pending; if
the server is still away the JSONL file keeps everything and its path is reported.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import UsageError, first_line

log = logging.getLogger(__name__)

# MLflow's HTTP client retries for minutes by default; a tracker must fail fast instead.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default, made absolute."""
    import mlflow

    if tracking_uri:
        return tracking_uri
    return mlflow.get_tracking_uri()


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For a local SQLite store keep artifacts beside the database (MLflow would use ./mlruns of
    whatever folder the process runs in); servers choose their own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None


class RunTracker:
    """One MLflow run with a local JSONL journal; see the module docstring. Rank 0 only."""

    def __init__(self, tracking_uri: str | None, experiment: str, journal: Path,
                 run_id: str | None = None, run_name: str | None = None) -> None:
        for key, value in HTTP_SETTINGS.items():
            os.environ.setdefault(key, value)
        self.uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.journal = Path(journal)
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.run_name = run_name
        self.offline = False
        self._warned = False
        self.pending: list[dict[str, Any]] = []
        self._logged_params: dict[str, str] = {}
        self._client: Any = None
        self._call(self._open)

    # -- MLflow calls, all through _call --------------------------------------------------------
    def _open(self) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(self.uri)
        if self.run_id:
            run = self._client.get_run(self.run_id)
            self._logged_params = dict(run.data.params)
            self._client.update_run(self.run_id, status="RUNNING")
            log.info("MLflow: continuing run %s in %s", self.run_id, self.uri)
            return
        exp = self._client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self._client.create_experiment(
            self.experiment, artifact_location=_artifact_location(self.uri, self.experiment))
        self.run_id = self._client.create_run(exp_id, run_name=self.run_name).info.run_id
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, self.experiment, self.uri)

    def _call(self, fn: Any, *args: Any) -> bool:
        if self.offline:
            return False
        try:
            fn(*args)
            return True
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            self.offline = True
            if self._warned:
                log.debug("MLflow call failed again: %s", e)
                return False
            self._warned = True
            log.warning("MLflow tracking at %s failed (%s: %s); training goes on, records are kept in %s "
                        "and sent at the end if the server is back", self.uri, type(e).__name__,
                        first_line(e)[:200], self.journal)
            return False

    def _send(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if self._client is None or self.run_id is None:
            self._open()
        metrics = [Metric(r["key"], r["value"], r["ts"], r["step"]) for r in records if r["kind"] == "metric"]
        params = [Param(r["key"], r["value"]) for r in records if r["kind"] == "param"
                  and r["key"] not in self._logged_params]
        tags = [RunTag(r["key"], r["value"]) for r in records if r["kind"] == "tag"]
        for i in range(0, len(params), 100):  # MLflow's per-request limits
            self._client.log_batch(self.run_id, params=params[i:i + 100])
        for i in range(0, len(tags), 100):
            self._client.log_batch(self.run_id, tags=tags[i:i + 100])
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self._logged_params.update({p.key: p.value for p in params})
        for r in records:
            if r["kind"] == "artifact":
                self._client.log_artifact(self.run_id, r["path"], r["artifact_path"])

    # -- public API -----------------------------------------------------------------------------
    def _record(self, **record: Any) -> None:
        with self.journal.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        self.pending.append(record)

    def log_params(self, params: dict[str, Any]) -> None:
        for key, value in params.items():
            self._record(kind="param", key=key, value=str(value)[:6000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._record(kind="tag", key=key, value=str(value))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            self._record(kind="metric", key=key, value=float(value), step=int(step), ts=ts)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._record(kind="artifact", path=str(path), artifact_path=artifact_path)

    def flush(self) -> None:
        """Send what is pending (call once per epoch: batches keep the HTTP traffic small)."""
        if self.pending and self._call(self._send, self.pending):
            self.pending = []

    def finish(self, status: str = "FINISHED") -> dict[str, Any]:
        """Send what is pending (retrying once if MLflow had failed) and end the run."""
        if self.offline:
            self.offline = False
            log.info("MLflow: retrying %d pending records to %s", len(self.pending), self.uri)
        self.flush()
        if not self.offline and self.run_id:
            self._call(self._client.set_terminated, self.run_id, status)
        if self.offline:
            log.warning("MLflow unreachable at %s: the run's %d unsent records stay in %s", self.uri,
                        len(self.pending), self.journal)
        return {"mlflow_run_id": self.run_id, "tracking_uri": self.uri, "tracking_ok": not self.offline,
                "metrics_jsonl": str(self.journal)}


def open_tracker(tracking_uri: str | None, experiment: str, journal: Path, run_file: Path, resume: bool,
                 run_name: str | None = None) -> RunTracker:
    """A tracker journaling to ``journal``. With ``resume`` the run id saved in ``run_file`` (for
    the same tracking URI) is continued and the journal appended to; else both start afresh."""
    run_file, journal = Path(run_file), Path(journal)
    run_id = None
    uri = resolve_tracking_uri(tracking_uri)
    if resume and run_file.is_file():
        saved = json.loads(run_file.read_text())
        if saved.get("tracking_uri") == uri:
            run_id = saved.get("run_id")
    elif not resume:
        journal.unlink(missing_ok=True)
    tracker = RunTracker(uri, experiment, journal, run_id=run_id, run_name=run_name)
    if tracker.run_id:
        run_file.write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": uri}))
    return tracker


def attach_tracker(tracker: RunTracker, trainer: Any, loss_every: int = 1) -> None:
    """Log ``train_loss`` per iteration (every ``loss_every``) and, at each epoch end, the dict the
    engines left in ``trainer.state.epoch_log`` (epoch loss, lr, timing, validation), then flush."""
    from ignite.engine import Events
    from monai.handlers import from_engine

    def _iteration(engine: Any) -> None:
        loss = from_engine(["loss"], first=True)(engine.state.output)
        tracker.log_metrics({"train_loss": float(loss)}, step=engine.state.iteration)

    def _epoch(engine: Any) -> None:
        tracker.log_metrics(getattr(engine.state, "epoch_log", {}), step=engine.state.epoch)
        tracker.flush()

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=loss_every), _iteration)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, _epoch)


# MLflow param name -> bundle id; ids a bundle lacks are skipped.
PARAM_IDS = {
    "network": "network_def#name", "features": "network_def#features", "spatial_dims": "spatial_dims",
    "out_channels": "out_channels", "loss": "loss#_target_", "w0": "w0", "sigma_mm": "sigma_mm",
    "optimizer": "optimizer#_target_", "lr": "learning_rate", "weight_decay": "weight_decay",
    "lr_scheduler": "lr_scheduler#_target_", "batch_size": "batch_size", "num_samples": "num_samples",
    "roi_size": "roi_size", "pixdim": "pixdim", "amp": "amp", "amp_dtype": "amp_dtype", "max_epochs": "max_epochs",
    "val_interval": "val_interval", "grad_clip_norm": "grad_clip_norm", "seed": "seed", "fold": "fold",
    "num_folds": "num_folds", "dice_include_background": "loss#include_background", "batch_dice": "loss#batch",
    "compile": "compile", "time_budget_min": "time_budget_min",
}


def bundle_params(parser: Any) -> dict[str, Any]:
    """The key hyperparameters of a parsed bundle, resolved (references and expressions evaluated)."""
    out = {}
    for name, id in PARAM_IDS.items():
        if id not in parser:
            continue
        raw = parser.get(id)
        out[name] = parser.get_parsed_content(id, instantiate=False) if isinstance(raw, str) and raw[:1] in "@$" else raw
    return out


def git_commit(folder: Path | None = None) -> str:
    """The commit of the code running (``unknown`` outside a git checkout)."""
    folder = folder or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def server_command(host: str, port: int, backend_store_uri: str, artifacts: Path | None = None) -> list[str]:
    """The ``mlflow server`` command line serving ``backend_store_uri`` on ``host:port``."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", backend_store_uri, "--workers", "1"]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(artifacts)]
    return cmd


def serve_ui(host: str = "127.0.0.1", port: int = 5000, tracking_uri: str | None = None,
             echo: Callable[[str], None] = log.info) -> int:
    """Run the MLflow UI on the resolved store (bound to 127.0.0.1 unless told otherwise);
    blocks until the server stops and returns its exit code. The address goes to ``echo`` (the
    CLI passes ``print``)."""
    uri = resolve_tracking_uri(tracking_uri)
    if urlparse(uri).scheme in ("http", "https"):
        raise UsageError(f"tracking URI {uri} is already a server: open it in a browser")
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
    echo(f"MLflow UI for {uri}: http://{host}:{port}  (Ctrl-C to stop)")
    try:
        return subprocess.call(server_command(host, port, uri, artifacts))
    except KeyboardInterrupt:
        return 0
