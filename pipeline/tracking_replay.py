"""Sending a run's journal again without doubling what MLflow holds (``pipeline.tracking``).

A ``--resume``, or a tracker that lost its server, sends the journal's records after its sent
marker again (``unsent_records``); MLflow may hold some of them already (sent before the marker
was rewritten), so ``drop_held`` leaves out those the run has: metric points, params, images,
dataset inputs, a model logged since the record, artifacts of the same name and size. A resumed
training first drops the unsent records of the epoch it trains again (``drop_superseded``).
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from pathlib import Path
from typing import Any

from pipeline.fileio import atomic_path
from pipeline.tracking_store import mlflow_key

log = logging.getLogger("pipeline.tracking")


def unsent_records(journal: Path, marker_file: Path, end: int, run_id: str | None) -> list[dict[str, Any]]:
    """The journal's records after the sent marker that belong to this run: all after it for a
    continued run (from the start without a marker for it), for a new run only those that
    never reached any run (the marker of a tracker that never had one)."""
    try:
        marker = json.loads(marker_file.read_text())
        start, marked_run = int(marker["offset"]), marker.get("run_id")
    except (OSError, ValueError, KeyError, TypeError):
        marker, start, marked_run = None, 0, None
    if marker is None or not 0 <= start <= end:
        start = 0 if run_id else end
    elif (marked_run or None) != (run_id or None):
        start = 0 if run_id else end  # another run's marker: all of it (continued) or none (new)
    records = []
    if start < end:
        with journal.open("rb") as f:
            f.seek(start)
            offset = start
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None  # a line a killed process left half written
                if isinstance(record, dict) and "kind" in record:
                    records.append({**record, "_off": offset, "_replay": True})
                offset += len(line)
    return records


def drop_held(client: Any, run_id: str, left: list[dict[str, Any]], logged_params: dict[str, str]) -> list[dict[str, Any]]:
    """``left`` without the replayed records (``_replay``) that the run holds already: metric
    points (key, step, time, value), params, images (key, step, time), dataset inputs, a
    model logged since the record, artifacts of the same name and size; of a file sent
    several times only the last record."""
    replay = [r for r in left if r.get("_replay")]
    run = client.get_run(run_id)
    logged_params.update(run.data.params)
    points = {(mlflow_key(r["key"]), r["step"], r["ts"], _same(r["value"])) for r in replay if r["kind"] == "metric"}
    held = set()
    for key in {p[0] for p in points}:
        held |= {(key, m.step, m.timestamp, _same(m.value)) for m in client.get_metric_history(run_id, key)}
    images = ([f.path for f in client.list_artifacts(run_id, "images")]
              if any(r["kind"] == "image" for r in replay) else [])
    inputs = {(d.dataset.name, d.dataset.digest, next((t.value for t in d.tags if t.key == "mlflow.data.context"), None))
              for d in (run.inputs.dataset_inputs if run.inputs else [])}
    artifacts: dict[str, int | None] = {}
    for folder in {r.get("artifact_path") or "" for r in replay if r["kind"] == "artifact"}:
        artifacts.update({f.path: f.file_size for f in client.list_artifacts(run_id, folder or None)})
    last = {(r["path"], r.get("artifact_path")): id(r) for r in replay if r["kind"] == "artifact"}

    def held_already(r: dict[str, Any]) -> bool:
        kind = r["kind"]
        if kind == "metric":
            return (mlflow_key(r["key"]), r["step"], r["ts"], _same(r["value"])) in held
        if kind == "param":
            return r["key"] in logged_params
        if kind == "image":
            prefix = f"images/{r['key'].replace('/', '~')}+step+{r['step'] or 0}+timestamp+{r['ts']}+"
            return any(path.startswith(prefix) for path in images)
        if kind == "dataset":
            return (r["name"], r["digest"], r.get("context", "training")) in inputs
        if kind == "model":
            return _model_logged_since(client, run, r.get("ts"))
        if kind == "artifact":
            if last[(r["path"], r.get("artifact_path"))] != id(r):
                return True  # sent as its last record (the file as it is now)
            name = posixpath.join(r.get("artifact_path") or "", Path(r["path"]).name)
            return Path(r["path"]).is_file() and artifacts.get(name) == Path(r["path"]).stat().st_size
        return False  # tags: setting one again changes nothing

    kept = [r for r in left if not (r.get("_replay") and held_already(r))]
    for r in kept:
        r.pop("_replay", None)
    if len(kept) < len(left):
        log.info("MLflow: %d of the %d journal records sent again were in run %s already", len(left) - len(kept),
                 len(replay), run_id)
    return kept


def _same(value: float) -> float | str:
    """A metric value to compare: NaN (an undefined HD95) equals itself here, as it never does as a float."""
    return "nan" if isinstance(value, float) and math.isnan(value) else value


def _model_logged_since(client: Any, run: Any, ts: int | None) -> bool:
    """Whether the run has a logged model created at or after ``ts`` (any, without ``ts``)."""
    outputs = getattr(getattr(run, "outputs", None), "model_outputs", None) or []
    if ts is None or not outputs:
        return bool(outputs)
    return any(client.get_logged_model(o.model_id).creation_timestamp >= ts for o in outputs)


#: the one flat metric logged per iteration (``pipeline.handlers.attach_tracker``); the others per epoch
ITERATION_KEYS = frozenset({"train_loss"})


def superseded(record: dict[str, Any], epoch: int, iteration: int) -> bool:
    """Whether ``record`` is training's from after (``epoch``, ``iteration``), the checkpoint a run
    resumes from: a metric (not a ``system/`` sample) or an image at a later step."""
    if record.get("kind") == "image":
        return int(record.get("step") or 0) > epoch
    if record.get("kind") != "metric" or str(record.get("key", "")).startswith("system/"):
        return False
    return int(record["step"]) > (iteration if record["key"] in ITERATION_KEYS else epoch)


def drop_superseded(journal: Path, marker_file: Path, end: int, run_id: str | None, epoch: int, iteration: int) -> int:
    """Remove from ``journal`` the records that never reached the run (after its sent marker) and
    are training's from after the checkpoint at (``epoch``, ``iteration``): a killed or failed run
    journaled the epoch it was in, and the resumed run trains that epoch again. Records before the
    marker are left (MLflow has them). Rewritten atomically; returns how many were removed."""
    unsent = {r["_off"] for r in unsent_records(journal, marker_file, end, run_id) if superseded(r, epoch, iteration)}
    if not unsent:
        return 0
    with journal.open("rb") as f, atomic_path(journal) as tmp, tmp.open("wb") as out:
        offset = 0
        for line in f:
            if offset not in unsent:
                out.write(line)
            offset += len(line)
    log.info("MLflow: %d records of %s from after the checkpoint (epoch %d) are dropped: that epoch is trained again",
             len(unsent), journal, epoch)
    return len(unsent)
