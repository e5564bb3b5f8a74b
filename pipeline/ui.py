"""``segpipe ui``: the MLflow UI over the project's store, one light process that stops cleanly.

``mlflow server`` starts a tree: the CLI process, uvicorn, and (MLflow 3) a job runner with a
pool of huey consumers, about 1.9 GiB idle; a SIGTERM to the CLI leaves the rest serving the
port. ``serve_ui`` instead runs MLflow's own ``server`` command with job execution and telemetry
off and one worker, and lets it *replace* the current process with uvicorn (``exec``) where it
would start uvicorn as a child: what remains is one process (about 250 MB), with the pid the
user started, that stops on SIGTERM or Ctrl-C (uvicorn's graceful shutdown) and leaves nothing
behind.

Before that it prints the address of the model-training view of the store's newest experiment
(the one with the newest run): MLflow 3's home page is its GenAI view, and a training run sits
under "Evaluation runs" there unless ``?workflowType=machine_learning`` is asked for.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import UsageError
from pipeline.tracking import UI_PORT, resolve_tracking_uri

log = logging.getLogger(__name__)

#: the server's environment: no job runner (huey consumers), no usage reporting
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
              "DO_NOT_TRACK": "true"}
TRAINING_VIEW = "#/experiments/{}/runs?workflowType=machine_learning"


def server_command(host: str, port: int, backend_store_uri: str, artifacts: Path | None = None) -> list[str]:
    """The ``mlflow server`` command line serving ``backend_store_uri`` on ``host:port`` with one
    worker (run it with ``SERVER_ENV`` for no job runner)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", backend_store_uri, "--workers", "1"]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(artifacts)]
    return cmd


def newest_experiment(uri: str) -> str | None:
    """The id of the store's experiment with the newest run (else the newest experiment; None
    for a store that cannot be read)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, order_by=["creation_time DESC"])
        if not experiments:
            return None
        ids = [e.experiment_id for e in experiments]
        runs = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.experiment_id if runs else ids[0]
    except Exception as e:  # noqa: BLE001 - the UI still starts; the address is its home page
        log.warning("cannot read the experiments of %s: %s", uri, e)
        return None


def ui_address(host: str, port: int, experiment_id: str | None) -> str:
    base = f"http://{host}:{port}/"
    return base + TRAINING_VIEW.format(experiment_id) if experiment_id is not None else base


def _check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); "
                             "is another UI running? choose another --port") from None


def _exec_in_place(cmd: list[str], extra_env: dict[str, str] | None = None, **_: Any) -> None:
    """Stands in for MLflow's ``_exec_cmd`` when it starts the web server: become that server."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, {**os.environ, **(extra_env or {})})


def serve_ui(host: str = "127.0.0.1", port: int = UI_PORT, tracking_uri: str | None = None,
             echo: Callable[[str], None] = log.info) -> int:
    """Serve the MLflow UI for the resolved store on ``host:port`` (127.0.0.1 unless told
    otherwise). The address of the newest experiment's training view goes to ``echo`` (the CLI
    passes ``print``); then this process *becomes* the server (see the module docstring) and does
    not return unless MLflow refuses to start (its exit code)."""
    import mlflow.server
    from mlflow.cli import server

    uri = resolve_tracking_uri(tracking_uri)
    if urlparse(uri).scheme in ("http", "https"):
        raise UsageError(f"tracking URI {uri} is already a server: open it in a browser")
    _check_port(host, port)
    args = ["--host", host, "--port", str(port), "--backend-store-uri", uri, "--workers", "1"]
    if uri.startswith("sqlite:///"):  # the tracker keeps a local store's artifacts beside it
        args += ["--artifacts-destination", str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts")]
    os.environ.update(SERVER_ENV)
    echo(f"MLflow UI for {uri}: {ui_address(host, port, newest_experiment(uri))}  (Ctrl-C to stop)")
    mlflow.server._exec_cmd = _exec_in_place  # the one hook: MLflow's server starts its web server here
    try:
        server.main(args=args, prog_name="segpipe ui", standalone_mode=False)
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # noqa: BLE001 - click/MLflow refusing the arguments or the store
        raise UsageError(f"MLflow server did not start: {e}") from None
    return 1  # only reached if MLflow no longer starts its server through _exec_cmd
