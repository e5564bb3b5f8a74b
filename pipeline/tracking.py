"""MLflow tracking that never loses a training run.

One MLflow run per training, in an experiment named after the bundle. The tracking URI is the
``--tracking-uri`` argument, else ``MLFLOW_TRACKING_URI``, else MLflow's default
(``sqlite:///mlflow.db`` in the working folder, which ``segpipe ui`` there reads).

Every record (param, tag, metric, artifact, image, dataset input, model) is appended to a local
JSONL file first and sent to MLflow in batches. If MLflow fails (server down, network), training
goes on: one warning, the tracker stops calling MLflow, and at ``finish`` it tries once more to
send what is pending; if the server is still away the JSONL file keeps everything and its path
is reported. Images and the model are files on disk that the journal points to. A marker beside
the journal (``<journal>.sent``: the run and the journal offset before which every record reached
it) is rewritten as records are sent, so that a ``--resume`` of the same run sends the journal's
records after it that MLflow still lacks (records it holds already are not sent twice).

Metric names: the engines and the bundles use flat names (``val_mean_dice`` is the bundles'
MONAI key metric, ``ModelSaver``'s and early stopping's); MLflow gets them grouped into sections
by ``mlflow_key`` (``train/``, ``val/``, ``perf/``, ``eval/``; ``system/`` for the system
metrics). The journal keeps the flat names. Steps are epochs for every per-epoch metric and
iterations only for ``train/loss_iteration``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, first_line, signals_deferred
from pipeline.fileio import atomic_path
from pipeline.tracking_replay import drop_held, drop_superseded, unsent_records
from pipeline.tracking_store import (
    artifact_location,
    mlflow_key,
    resolve_tracking_uri,
    run_address,
    store_refusal,
)

log = logging.getLogger(__name__)

# MLflow's HTTP client retries for minutes by default; a tracker must fail fast instead.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

class RunTracker:
    """One MLflow run with a local JSONL journal; see the module docstring. Rank 0 only."""

    def __init__(self, tracking_uri: str | None, experiment: str, journal: Path,
                 run_id: str | None = None, run_name: str | None = None, run_file: Path | None = None,
                 resumed_at: tuple[int, int] | None = None) -> None:
        for key, value in HTTP_SETTINGS.items():
            os.environ.setdefault(key, value)
        self.uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.journal = Path(journal)
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self.marker = sent_marker(self.journal)
        self.run_id, self.run_name, self.experiment_id = run_id, run_name, None
        self.run_file = Path(run_file) if run_file is not None else None  # where --resume finds the run
        self.offline = False
        self._warned = False
        self._lock = threading.Lock()  # the system-metrics thread records too
        self._stop_system: Callable[[], None] | None = None
        self._logged_params: dict[str, str] = {}
        self._client: Any = None
        self._marked: tuple[int, str | None] | None = None
        self._end = self._journal_end()
        if resumed_at is not None and drop_superseded(self.journal, self.marker, self._end, run_id, *resumed_at):
            self._end = self._journal_end()
        #: records to send, each with ``_off``, its offset in the journal; first the journal's
        #: records that did not reach this run before (``_replay``: MLflow may hold some already)
        self.pending: list[dict[str, Any]] = self._unsent_records(run_id)
        #: with ``commit``: only records before this journal offset are sent (a training run's up to
        #: its last checkpoint); None: every record
        self.committed: int | None = None
        self.refused = store_refusal(self.uri)  # MLflow will never open this store (or retries for minutes)
        if self.refused:
            self.offline = self._warned = True
            log.warning("MLflow tracking is off: %s. Training goes on; its records are kept in %s and are not "
                        "sent to this store", self.refused, self.journal)
        self._call(self._open)

    # -- the journal and its sent marker --------------------------------------------------------
    def _journal_end(self) -> int:
        """The journal's size, after ending a line a killed process left half written (the next
        record must not be glued to it)."""
        if not self.journal.is_file():
            return 0
        with self.journal.open("rb+") as f:
            end = f.seek(0, os.SEEK_END)
            if end and (f.seek(end - 1), f.read(1))[1] != b"\n":
                f.write(b"\n")
                end += 1
        return end

    def _unsent_records(self, run_id: str | None) -> list[dict[str, Any]]:
        records = unsent_records(self.journal, self.marker, self._end, run_id)
        if records:
            log.info("MLflow: %d records of %s after its last send are sent again where MLflow lacks them",
                     len(records), self.journal)
        return records

    def _mark(self, left: list[dict[str, Any]]) -> None:
        """Rewrite the sent marker: every record before the first unsent one (``left`` holds
        those in flight, ``pending`` the newer ones) reached the run."""
        with self._lock:
            first = left[0] if left else self.pending[0] if self.pending else None
            offset = first["_off"] if first is not None else self._end
        if (offset, self.run_id) != self._marked:
            with atomic_path(self.marker) as tmp:
                tmp.write_text(json.dumps({"run_id": self.run_id, "offset": offset}))
            self._marked = (offset, self.run_id)

    # -- MLflow calls, all through _call --------------------------------------------------------
    def _open(self) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(self.uri)
        if self.run_id:
            run = self._client.get_run(self.run_id)
            self._logged_params = dict(run.data.params)
            self.experiment_id = run.info.experiment_id
            self._client.update_run(self.run_id, status="RUNNING")
            log.info("MLflow: continuing run %s in %s", self.run_id, self.uri)
        else:
            exp = self._client.get_experiment_by_name(self.experiment)
            self.experiment_id = exp.experiment_id if exp else self._client.create_experiment(
                self.experiment, artifact_location=artifact_location(self.uri, self.experiment))
            self.run_id = self._client.create_run(self.experiment_id, run_name=self.run_name).info.run_id
            log.info("MLflow: run %s in experiment %r at %s", self.run_id, self.experiment, self.uri)
        if self.run_file is not None:  # also for a run made late, once the server is back
            with atomic_path(self.run_file) as tmp:  # a kill mid-write must not break every later --resume
                tmp.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri,
                                           "experiment_id": self.experiment_id}))

    def _call(self, fn: Any, *args: Any) -> bool:
        if self.offline:
            return False
        try:
            with signals_deferred():  # a kill lands between MLflow writes, so the run can still end KILLED
                fn(*args)
            return True
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            self.offline = True
            if self._warned:
                log.debug("MLflow call failed again: %s", e)
                return False
            self._warned = True
            away = "server" if self.uri.startswith(("http://", "https://")) else "store"
            log.warning("MLflow tracking at %s failed (%s: %s); training goes on, records are kept in %s "
                        "and sent at the end if the %s is back (else by a --resume)", self.uri, type(e).__name__,
                        first_line(e)[:200], self.journal, away)
            return False

    def _send(self, left: list[dict[str, Any]]) -> None:
        """Send ``left`` (scalars in batches, then files one by one), removing what was sent."""
        from mlflow.entities import Metric, Param, RunTag

        if self._client is None or self.run_id is None:
            self._open()
        if any(r.get("_replay") for r in left):
            left[:] = self._drop_sent(left)
        metrics = [Metric(mlflow_key(r["key"]), r["value"], r["ts"], r["step"]) for r in left if r["kind"] == "metric"]
        params = [Param(r["key"], r["value"]) for r in left if r["kind"] == "param"
                  and r["key"] not in self._logged_params]
        tags = [RunTag(r["key"], r["value"]) for r in left if r["kind"] == "tag"]
        for i in range(0, len(params), 100):  # MLflow's per-request limits
            self._client.log_batch(self.run_id, params=params[i:i + 100])
        for i in range(0, len(tags), 100):
            self._client.log_batch(self.run_id, tags=tags[i:i + 100])
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self._logged_params.update({p.key: p.value for p in params})
        left[:] = [r for r in left if r["kind"] not in ("metric", "param", "tag")]
        self._mark(left)
        while left:
            self._send_file(left[0])
            left.pop(0)
            self._mark(left)

    def _drop_sent(self, left: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return drop_held(self._client, self.run_id, left, self._logged_params)

    def _send_file(self, r: dict[str, Any]) -> None:
        if r["kind"] in ("artifact", "image", "model") and not Path(r["path"]).exists():
            log.warning("MLflow: %s is gone; its %s record in %s is not sent", r["path"], r["kind"], self.journal)
            return
        if r["kind"] == "artifact":
            self._client.log_artifact(self.run_id, r["path"], r["artifact_path"])
        elif r["kind"] == "image":
            from PIL import Image

            with Image.open(r["path"]) as image:
                self._client.log_image(self.run_id, image.convert("RGB"), key=r["key"], step=r["step"],
                                       timestamp=r["ts"], synchronous=True)
        elif r["kind"] == "dataset":
            self._client.log_inputs(self.run_id, [dataset_input(r)])
        elif r["kind"] == "model":
            from pipeline.mlflow_model import log_bundle_model

            try:
                log_bundle_model(self.uri, self.run_id, Path(r["path"]), r["name"], r["register"], r.get("description", ""))
            except Exception as e:  # noqa: BLE001 - a model MLflow refuses must not lose the run
                self._client.get_run(self.run_id)  # the server is away: keep the record (raises)
                log.warning("MLflow: the model in %s was not logged (%s: %s)", r["path"], type(e).__name__,
                            first_line(e)[:300])

    # -- public API -----------------------------------------------------------------------------
    def _record(self, **record: Any) -> None:
        with self._lock:
            with self.journal.open("a") as f:
                offset = f.tell()
                f.write(json.dumps(record, default=str) + "\n")
                self._end = f.tell()
            self.pending.append({**record, "_off": offset})

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

    def log_image(self, path: Path, key: str, step: int) -> None:
        """A PNG as an MLflow image under ``key`` at ``step`` (the UI slides through the steps)."""
        self._record(kind="image", path=str(path), key=key, step=int(step), ts=int(time.time() * 1000))

    def log_dataset(self, manifest: Path, digest: str, context: str = "training") -> None:
        """The manifest as the run's dataset input (MLflow's Datasets column; ``digest``: the
        manifest's hash), with ``fingerprint.json`` and ``splits.json`` beside it attached."""
        self._record(kind="dataset", **manifest_dataset(Path(manifest), digest), context=context)
        for name in ("fingerprint.json", "splits.json"):
            if (Path(manifest).parent / name).is_file():
                self.log_artifact(Path(manifest).parent / name, "dataset")

    def log_model(self, folder: Path, name: str, register: bool, description: str = "") -> None:
        """The staged bundle in ``folder`` (``pipeline.mlflow_model.stage_bundle``) as an MLflow
        model named ``name``; with ``register`` also a new version of the registered model
        ``name`` (with ``description``)."""
        self._record(kind="model", path=str(folder), name=name, register=bool(register), description=description,
                     ts=int(time.time() * 1000))

    def has_model(self) -> bool:
        """Whether this run (its journal, kept across resumes) has logged a model already."""
        if not self.journal.is_file():
            return False
        return any(json.loads(line).get("kind") == "model" for line in self.journal.read_text().splitlines()
                   if '"kind": "model"' in line)

    def start_system_metrics(self, interval_s: float | None = None) -> None:
        """CPU, memory, disk, network (and GPU where NVML sees one) every ``interval_s`` seconds as
        ``system/...`` metrics, through the journal; stopped by ``finish``."""
        from pipeline.system_metrics import start_sampler

        if self._stop_system is None:  # a resumed run's samples continue its steps
            lines = self.journal.read_text().splitlines() if self.journal.is_file() else []
            steps = [int(m.group(1)) for line in lines if '"key": "system/' in line
                     and (m := re.search(r'"step": (\d+)', line))]
            self._stop_system = start_sampler(self.log_metrics, interval_s, first_step=max(steps, default=-1) + 1)

    def commit(self) -> None:
        """From now on ``flush`` sends only the records journaled before this call (training
        commits after each checkpoint: records of an epoch the checkpoint does not hold, which a
        ``--resume`` trains again, never reach MLflow, so no step is logged twice)."""
        with self._lock:
            self.committed = self._end

    def flush(self) -> None:
        """Send what is pending (call once per epoch: batches keep the HTTP traffic small); after a
        ``commit``, only what was committed."""
        with self._lock:
            cut = len(self.pending) if self.committed is None else sum(r["_off"] < self.committed for r in self.pending)
            left, self.pending = self.pending[:cut], self.pending[cut:]
        if left and not self._call(self._send, left):
            with self._lock:
                self.pending = left + self.pending
            self._mark([])  # what was sent before the failure

    def finish(self, status: str = "FINISHED") -> dict[str, Any]:
        """Send what is pending (retrying once if MLflow had failed) and end the run. A run ending
        otherwise than FINISHED (killed, failed) sends only what was committed: the rest, from an
        epoch no checkpoint holds, stays in the journal until a ``--resume`` replaces it."""
        if self._stop_system is not None:
            self._stop_system()
            self._stop_system = None
        if status == "FINISHED":
            self.committed = None
        elif self.committed is not None and (held := sum(r["_off"] >= self.committed for r in self.pending)):
            log.info("MLflow: %d records after the last checkpoint are not sent (a --resume trains that epoch "
                     "again); they stay in %s", held, self.journal)
        if self.offline and not self.refused:
            self.offline = False
            log.info("MLflow: retrying %d pending records to %s", len(self.pending), self.uri)
        self.flush()
        if not self.offline and self.run_id:
            self._call(self._client.set_terminated, self.run_id, status)
        if self.refused:
            log.warning("MLflow did not get this run (%s is refused): its %d records stay in %s", self.uri,
                        len(self.pending), self.journal)
        elif self.offline:
            log.warning("MLflow unreachable at %s: the run's %d unsent records stay in %s (a --resume of the run "
                        "sends them)", self.uri, len(self.pending), self.journal)
        return {"mlflow_run_id": self.run_id, "tracking_uri": self.uri, "tracking_ok": not self.offline,
                "metrics_jsonl": str(self.journal), "mlflow_run_view": self.address()}

    def address(self) -> str:
        return run_address(self.uri, self.experiment_id, self.run_id)


def manifest_dataset(manifest: Path, digest: str) -> dict[str, Any]:
    """A manifest as an MLflow dataset record: name, digest, source and a small profile."""
    try:
        m = json.loads(Path(manifest).read_text())
    except (OSError, ValueError):
        m = {}
    profile = {"cases": len(m.get("training", [])), "test_cases": len(m.get("test", [])),
               "labels": m.get("labels"), "modality": m.get("modality")}
    name = str(m.get("name") or Path(manifest).parent.name)
    return {"name": name, "digest": digest, "source": Path(manifest).resolve().as_uri(),
            "profile": json.dumps(profile, default=str)}


def dataset_input(r: dict[str, Any]) -> Any:
    """The ``mlflow.entities.DatasetInput`` of a dataset record (``manifest_dataset`` + context)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=r["name"], digest=r["digest"], source_type="local",
                      source=json.dumps({"uri": r["source"]}), profile=r.get("profile"))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", r.get("context", "training"))])


def open_tracker(tracking_uri: str | None, experiment: str, journal: Path, run_file: Path, resume: bool,
                 run_name: str | None = None, resumed_at: tuple[int, int] | None = None) -> RunTracker:
    """A tracker journaling to ``journal``. With ``resume`` the run id saved in ``run_file`` (for
    the same tracking URI) is continued and the journal appended to; else both start afresh.
    ``resumed_at``: the (epoch, iteration) training resumes from; the journal's unsent training
    records after it, of an epoch trained again, are dropped (``tracking_replay.drop_superseded``)."""
    run_file, journal = Path(run_file), Path(journal)
    run_id = None
    uri = resolve_tracking_uri(tracking_uri)
    if resume and run_file.is_file():
        try:
            saved = json.loads(run_file.read_text())
        except (ValueError, OSError):
            saved = None
        if not isinstance(saved, dict):
            raise InputError(f"{run_file}: not the record of an MLflow run (delete it to start a new run; "
                             f"the local journal {journal.name} keeps the records)")
        before = resolve_tracking_uri(saved["tracking_uri"]) if isinstance(saved.get("tracking_uri"), str) else None
        if before == uri:  # (a relative URI saved before they were made absolute: this folder's)
            run_id = saved.get("run_id")
        elif before and saved.get("run_id"):
            log.warning("--resume: run %s is in %s, not in %s: a new run starts there (--tracking-uri %s "
                        "continues that one)", saved["run_id"], before, uri, shlex.quote(before))
    elif not resume:
        journal.unlink(missing_ok=True)
        sent_marker(journal).unlink(missing_ok=True)
    return RunTracker(uri, experiment, journal, run_id=run_id, run_name=run_name, run_file=run_file,
                      resumed_at=resumed_at if resume else None)


def sent_marker(journal: Path) -> Path:
    """The file beside ``journal`` that says up to where its records reached MLflow."""
    return Path(journal).with_name(Path(journal).name + ".sent")
