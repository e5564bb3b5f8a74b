"""Which MLflow store: its URI made absolute (the same store from any working folder), a store
MLflow cannot open said in one line (a file store it no longer opens, a plain path to a SQLite
database, a ``sqlite:///`` path that is no SQLite database, a scheme it does not know), where
artifacts of a local store go, where a run opens in the UI, and the MLflow key of a flat metric
name. No MLflow import at module level (``segpipe ui`` and the tracker share it)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

UI_PORT = 5000
#: the first 16 bytes of every SQLite database file (an empty file is a new database too)
SQLITE_HEADER = b"SQLite format 3\x00"
#: the stores MLflow opens by scheme, where its registry cannot be asked (``known_schemes``)
STORE_SCHEMES = frozenset({"", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "http", "https"})


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default, made absolute
    (``absolute_uri``): the same store from any working folder."""
    import mlflow

    return absolute_uri(tracking_uri or mlflow.get_tracking_uri())


def absolute_uri(uri: str) -> str:
    """A local store's URI with its path made absolute against the working folder
    (``sqlite:///mlflow.db`` -> ``sqlite:////work/mlflow.db``, ``file:./mlruns`` and a plain
    ``./mlruns`` likewise); servers, databases and absolute paths as they are."""
    if uri.startswith("sqlite:///"):
        path, sep, query = uri[len("sqlite:///"):].partition("?")
        if path and path != ":memory:" and not path.startswith("/"):
            return f"sqlite:///{os.path.abspath(path)}{sep}{query}"
        return uri
    parsed = urlparse(uri)
    if parsed.scheme == "file" and not parsed.netloc:
        path = url2pathname(parsed.path)
        return uri if os.path.isabs(path) else Path(os.path.abspath(path)).as_uri()
    if not parsed.scheme and uri not in ("databricks", "") and not os.path.isabs(uri):
        return os.path.abspath(uri)  # a plain path: MLflow's file store
    return uri


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local store (SQLite database, file store); None for others."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].partition("?")[0]
        return Path(path) if path and path != ":memory:" else None
    parsed = urlparse(uri)
    if parsed.scheme == "file" and not parsed.netloc:
        return Path(url2pathname(parsed.path))
    if not parsed.scheme and uri not in ("databricks", ""):
        return Path(uri)
    return None


def is_sqlite_file(path: Path) -> bool:
    """Whether ``path`` is a file that begins with SQLite's header (``SQLITE_HEADER``)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def sqlite_uri(path: Path | str) -> str:
    """The ``sqlite:///`` URI of a database file, its path made absolute."""
    return f"sqlite:///{os.path.abspath(path)}"


def file_store_refusal(uri: str) -> str | None:
    """For a plain path or ``file:`` URI that MLflow would open as a file store, one line: a
    SQLite database named so (MLflow takes any URI without a scheme for a file store, so the
    database's own ``sqlite:///`` URI is given instead: this module does not guess), or a file
    store (``./mlruns``) the installed MLflow refuses to open, with how to migrate it to a
    database; None for other stores (and for file stores while MLflow still opens them:
    ``MLFLOW_ALLOW_FILE_STORE=true``, MLflow < 3.7). The tracker and ``segpipe ui`` both use it."""
    path = local_store_path(uri)
    if uri.startswith("sqlite:") or path is None:
        return None
    if path.is_file():  # a file store is a folder
        if is_sqlite_file(path):
            return (f"{uri} is a SQLite database, not a file store: use --tracking-uri "
                    f"{shlex.quote(sqlite_uri(path))}")
        return f"{uri} is a file, neither a SQLite database nor an MLflow file store (a folder)"
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # an MLflow that opens file stores
        return None
    if MLFLOW_ALLOW_FILE_STORE.get():
        return None
    import mlflow

    folder = Path(os.path.abspath(path))
    target = sqlite_uri(folder.parent / "mlflow.db")
    return (f"{uri} is a file store, which MLflow {mlflow.__version__} no longer opens: migrate it with "
            f"`mlflow migrate-filestore --source {shlex.quote(str(folder))} --target {shlex.quote(target)}` "
            f"and use --tracking-uri {shlex.quote(target)} (or set MLFLOW_ALLOW_FILE_STORE=true)")


def known_schemes() -> frozenset[str]:
    """The URI schemes of the stores the installed MLflow opens (its registry, plugins included)."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return frozenset(_tracking_store_registry._registry) | {""}
    except (ImportError, AttributeError):  # another MLflow's internals: the stores it always had
        return STORE_SCHEMES


def store_refusal(uri: str) -> str | None:
    """One line for a store MLflow cannot open, said before it retries for minutes and answers
    with pages of tracebacks: a scheme it does not know, a ``sqlite:///`` path that is a folder,
    unreadable or not a SQLite database (an absent one MLflow creates, an empty file is a new
    database), and ``file_store_refusal``'s; None for the others."""
    scheme = urlparse(uri).scheme
    if scheme and scheme.split("+")[0] not in known_schemes():
        return (f"tracking URI {uri}: unknown scheme {scheme}:// (MLflow stores: sqlite:///PATH, "
                "postgresql://, mysql://, mssql://, a server's http(s)://)")
    path = local_store_path(uri) if uri.startswith("sqlite:") else None
    if path is not None and path.exists():
        if path.is_dir():
            return f"{path} ({uri}) is a folder, not a SQLite database: name the database file in it"
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as e:
            return f"{path} ({uri}): cannot read it ({e.strerror})"
        if head and head != SQLITE_HEADER:
            return f"{path} ({uri}) is not a SQLite database (it does not begin with SQLite's header)"
    return file_store_refusal(uri)


def artifacts_root(uri: str) -> Path | None:
    """Where a local SQLite store's artifacts go: ``mlartifacts/`` beside the database (MLflow
    would use ./mlruns of whatever folder the process runs in); None for other stores (servers
    choose their own). The tracker and ``segpipe ui`` both use it."""
    db = local_store_path(uri) if uri.startswith("sqlite:///") else None
    return db.resolve().parent / "mlartifacts" if db is not None else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """An experiment's artifact location in a local SQLite store (``artifacts_root``), else None."""
    root = artifacts_root(uri)
    return (root / experiment).as_uri() if root is not None else None


def run_address(uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """Where a run opens in the MLflow UI: the page itself for a server, else the ``segpipe ui``
    command that serves the store and the page there."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"{segpipe_command()} ui --tracking-uri {shlex.quote(uri)}, then http://127.0.0.1:{UI_PORT}/{page}"


def segpipe_command() -> str:
    """The command that runs this segpipe from any folder, for lines that tell users what to run:
    the ``segpipe`` script beside the running interpreter (the virtual environment's) by its
    absolute path, else ``python -m pipeline``."""
    import sys

    python = os.path.abspath(sys.executable)
    script = Path(python).parent / "segpipe"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(python)} -m pipeline"


#: flat metric name (engines, bundles, journal) -> MLflow key (sections by prefix)
METRIC_KEYS = {
    "train_loss": "train/loss_iteration", "train_loss_epoch": "train/loss", "lr": "train/lr",
    "val_mean_dice": "val/mean_dice", "best_val_mean_dice": "val/best_mean_dice",
    "epoch_time_s": "perf/epoch_time_s", "samples_per_s": "perf/samples_per_s",
    "voxels_per_s": "perf/voxels_per_s", "data_wait_fraction": "perf/data_wait_fraction",
}
#: flat prefixes -> MLflow prefixes, for names with a label in them
KEY_PREFIXES = (("val_dice_", "val/dice_"), ("eval_", "eval/"))


def class_metric_name(name: str) -> str:
    """A label name as part of an MLflow metric key (alphanumerics and ``_ - . /`` kept, the rest ``_``)."""
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in name)


def mlflow_key(name: str) -> str:
    """The MLflow key of a flat metric name (``val_dice_liver`` -> ``val/dice_liver``); names
    already holding a ``/`` and unknown names are kept."""
    if name in METRIC_KEYS:
        return METRIC_KEYS[name]
    for flat, sectioned in KEY_PREFIXES:
        if name.startswith(flat):
            return sectioned + name[len(flat):]
    return name
