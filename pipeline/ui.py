"""``segpipe ui``: the MLflow UI over the project's store, one light process that stops cleanly.

``mlflow server`` starts a tree: the CLI process, uvicorn, and (MLflow 3) a job runner with a
pool of huey consumers, about 1.9 GiB idle; a SIGTERM to the CLI leaves the rest serving the
port. ``serve_ui`` instead runs MLflow's own ``server`` command with job execution and telemetry
off and one worker, and lets it *replace* the current process with uvicorn (``exec``) where it
would start uvicorn as a child: what remains is one process (about 250 MB), with the pid the
user started, that stops on SIGTERM or Ctrl-C (uvicorn's graceful shutdown) and leaves nothing
behind.

It prints the address of the model-training view of the store's newest experiment (the one
with the newest run; MLflow 3's home page is its GenAI view, and a training run sits under
"Evaluation runs" there unless ``?workflowType=machine_learning`` is asked for) once the server
answers there, not before: a process forked (twice: it is no part of the server's tree) just
before the exec asks the server's ``/health`` and prints the line when it answers, or nothing
when the server ends first (``announce_when_answering``).

MLflow's security middleware answers only requests whose ``Host`` header it allows (localhost,
private IPs) and refuses state-changing requests from other origins (the UI's own, reached by
name). On a loopback ``--host`` MLflow's defaults stand; on another the allowed hosts are
``--allowed-hosts`` if given, else this machine's names and addresses and MLflow's defaults, and
the UI's origin on each of them (``http://NAME:PORT``) is allowed too (``server_args``).

A store that is missing (MLflow would create an empty one) or that MLflow cannot open (a file
store, ``./mlruns``; a ``sqlite:///`` path that is a folder or no SQLite database, which MLflow
retries for minutes before pages of tracebacks; a plain path to a SQLite database; an unknown
scheme) is one error line before MLflow runs (``check_store``).
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import UsageError
from pipeline.fileio import pid_alive
from pipeline.tracking_store import (
    UI_PORT,
    artifacts_root,
    local_store_path,
    resolve_tracking_uri,
    store_refusal,
)

log = logging.getLogger(__name__)

#: the server's environment: no job runner (huey consumers), no usage reporting
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
              "DO_NOT_TRACK": "true"}
#: warnings of the server's libraries to themselves, not to a user (``PYTHONWARNINGS`` syntax)
QUIET_WARNINGS = "ignore:starlette.middleware.wsgi is deprecated"
TRAINING_VIEW = "#/experiments/{}/runs?workflowType=machine_learning"
#: the Host headers of this machine's own loopback (MLflow's own list; any port)
LOCALHOST_HOSTS = ["localhost", "127.0.0.1", "[::1]", "localhost:*", "127.0.0.1:*", "[[]::1]:*"]
#: how long the UI's address waits for the server to answer (it starts in seconds; a loaded machine, longer)
ANSWER_WAIT_S = 300.0


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


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _url_host(host: str) -> str:
    """``host`` as it stands in a URL (an IPv6 address in brackets)."""
    ip = _ip(host)
    return f"[{ip}]" if ip is not None and ip.version == 6 else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine's loopback (127.0.0.1, ::1, localhost, a name for them)."""
    ip = _ip(host)
    if ip is not None:
        return ip.is_loopback
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(found) and all((a := _ip(f.split("%")[0])) is not None and a.is_loopback for f in found)


def _is_wildcard(host: str) -> bool:
    ip = _ip(host)
    return host == "" or (ip is not None and ip.is_unspecified)


def machine_name() -> str:
    """The name other machines reach this one by: its fully qualified name, else its host name."""
    fqdn, name = socket.getfqdn(), socket.gethostname()
    return fqdn if "." in fqdn and not fqdn.startswith("localhost") else name


def machine_hosts() -> list[str]:
    """This machine's names and its (not loopback, not link-local) addresses, as Host headers
    name them (IPv6 in brackets)."""
    names = [machine_name(), socket.gethostname(), socket.getfqdn()]
    addresses: list[str] = []
    try:
        import psutil

        addresses = [a.address for nic in psutil.net_if_addrs().values() for a in nic
                     if a.family in (socket.AF_INET, socket.AF_INET6)]
    except Exception:  # noqa: BLE001 - the names still do
        pass
    try:
        addresses += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
    except (OSError, UnicodeError):
        pass
    for address in addresses:
        ip = _ip(address.split("%")[0])
        if ip is not None and not ip.is_loopback and not ip.is_link_local:
            names.append(_url_host(str(ip)))
    out: list[str] = []
    for name in names:
        if name and not name.startswith("localhost") and name not in out:
            out.append(name)
    return out


def _mlflow_default_hosts() -> list[str]:
    try:
        from mlflow.server.security_utils import get_default_allowed_hosts

        return list(get_default_allowed_hosts())
    except Exception:  # noqa: BLE001 - an MLflow without it: localhost
        return list(LOCALHOST_HOSTS)


def allowed_hosts_for(host: str, port: int, allowed_hosts: str | None = None) -> tuple[list[str], list[str]]:
    """``(Host headers, origins)`` to allow (``--allowed-hosts``, ``--cors-allowed-origins``), or
    empty lists for MLflow's own defaults: those of ``allowed_hosts`` (comma-separated, MLflow's
    patterns) with localhost's; else, on a ``host`` other than loopback (and without MLflow's
    ``MLFLOW_SERVER_ALLOWED_HOSTS``), this machine's names and addresses at ``port`` (and
    ``host``) with MLflow's defaults (localhost, private IPs). The origins are the UI's own at each
    named host (not MLflow's wildcards): the UI reached by name posts from there."""
    if allowed_hosts is not None:
        given = [h.strip() for h in allowed_hosts.split(",") if h.strip()]
        if not given:
            raise UsageError("--allowed-hosts: no host given (comma-separated names, addresses or patterns)")
        hosts = list(LOCALHOST_HOSTS)  # a name without a port: also at the UI's (a browser's Host names it)
        for h in given:
            hosts += [x for x in ((h,) if "*" in h or _has_port(h) else (h, f"{h}:{port}")) if x not in hosts]
        origins = [_origin(h, port) for h in given if h != "*" and h.split(":")[0] not in ("localhost", "127.0.0.1")]
        return hosts, origins
    if is_loopback(host) or os.environ.get("MLFLOW_SERVER_ALLOWED_HOSTS"):
        return [], []
    names = machine_hosts()
    if not _is_wildcard(host) and _url_host(host) not in names:
        names.insert(0, _url_host(host))
    hosts = _mlflow_default_hosts()
    hosts += [h for name in names for h in (name, f"{name}:{port}") if h not in hosts]
    return hosts, [f"http://{name}:{port}" for name in names]


def _has_port(pattern: str) -> bool:
    return "]:" in pattern if pattern.startswith("[") else ":" in pattern


def _origin(pattern: str, port: int) -> str:
    """The UI's origin at a Host pattern: ``http://name:port`` (the pattern's own port, or any
    for a pattern ending in ``*``)."""
    return f"http://{pattern}" if _has_port(pattern) or pattern.endswith("*") else f"http://{pattern}:{port}"


def host_allowed(hosts: list[str], host: str) -> bool:
    """Whether MLflow's middleware lets the Host header ``host`` in (its fnmatch rule)."""
    return not hosts or "*" in hosts or any(fnmatch.fnmatch(host, h) if "*" in h else host == h for h in hosts)


def display_host(host: str, port: int, hosts: list[str]) -> str:
    """The host to print in the UI's address: ``host`` (loopback, or a name or address given),
    for all interfaces (0.0.0.0, ::) this machine's name, or the first plain allowed host when
    that name is not allowed."""
    if not _is_wildcard(host):
        return _url_host(host)
    name = machine_name()
    if host_allowed(hosts, f"{name}:{port}"):
        return name
    plain = [h for h in hosts if h not in LOCALHOST_HOSTS and "*" not in h and not _has_port(h)]
    return plain[0] if plain else name


def ui_address(host: str, port: int, experiment_id: str | None, hosts: list[str] | None = None) -> str:
    base = f"http://{display_host(host, port, hosts or [])}:{port}/"
    return base + TRAINING_VIEW.format(experiment_id) if experiment_id is not None else base


def server_args(host: str, port: int, uri: str, allowed_hosts: str | None = None) -> list[str]:
    """The arguments ``segpipe ui`` gives MLflow's ``server`` command (``allowed_hosts_for``)."""
    args = ["--host", host, "--port", str(port), "--backend-store-uri", uri, "--registry-store-uri", uri,
            "--workers", "1"]  # (the registry named: else MLflow says on every start that it took the store)
    if (root := artifacts_root(uri)) is not None:  # where the tracker keeps a local store's artifacts
        args += ["--artifacts-destination", str(root)]
    hosts, origins = allowed_hosts_for(host, port, allowed_hosts)
    if hosts:
        args += ["--allowed-hosts", ",".join(hosts)]
    if origins and not os.environ.get("MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"):
        args += ["--cors-allowed-origins", ",".join(origins)]
    return args


def check_store(uri: str) -> None:
    """A local store that is missing (MLflow would serve a new empty one) or that MLflow cannot
    open (``pipeline.tracking_store.store_refusal``: an unknown scheme, a ``sqlite:///`` path that
    is no SQLite database, a plain path to one, a file store) is a UsageError line."""
    path = local_store_path(uri)
    if path is not None and not path.exists():
        raise UsageError(f"no MLflow store at {path} ({uri}): run segpipe ui in the folder that holds mlflow.db, "
                         "or name the store with --tracking-uri (segpipe ui creates none)")
    refusal = store_refusal(uri)
    if refusal:
        raise UsageError(refusal)


def health_url(host: str, port: int) -> str:
    """Where this machine asks the server on ``host:port`` whether it answers (its loopback for
    all interfaces)."""
    if _is_wildcard(host):
        return f"http://{'[::1]' if ':' in host else '127.0.0.1'}:{port}/health"
    return f"http://{_url_host(host)}:{port}/health"


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether an HTTP server answers at ``url`` (any status: a refused Host is an answer too)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # this machine: no proxy
    try:
        with opener.open(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def announce_when_answering(url: str, line: str, echo: Callable[[str], None], server_pid: int,
                            wait_s: float = ANSWER_WAIT_S, every_s: float = 0.2) -> bool:
    """``echo(line)`` once ``url`` answers; nothing (False) when process ``server_pid`` ends first
    or ``wait_s`` passes."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if answers(url):
            echo(line)
            return True
        if not pid_alive(server_pid):
            return False
        time.sleep(every_s)
    return False


def _announce_in_background(url: str, line: str, echo: Callable[[str], None]) -> None:
    """``announce_when_answering`` for this process (about to become the server) in a process
    forked twice, so that it is no child of the server's; Ctrl-C to the terminal ends it quietly."""
    server = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    try:
        if os.fork() == 0:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            announce_when_answering(url, line, echo, server)
            sys.stdout.flush()
    finally:
        os._exit(0)  # neither child runs the parent's exit handlers


def _check_listen(host: str, port: int) -> None:
    """A port number out of range, a ``--host`` that is not this machine's, a port in use: each a
    UsageError line naming the option at fault."""
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: not a port number (1-65535)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as e:
        raise UsageError(f"--host {host}: not a name or address this machine knows "
                         f"({getattr(e, 'strerror', None) or e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise UsageError(f"--host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1 "
                                 "(this machine only), 0.0.0.0 (all its addresses) or one of its own") from None
            if e.errno == errno.EACCES:
                raise UsageError(f"--port {port}: not allowed to listen on it ({e.strerror}); "
                                 "ports below 1024 need privileges: choose another --port") from None
            raise UsageError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); "
                             "is another UI running? choose another --port") from None


def _exec_in_place(cmd: list[str], extra_env: dict[str, str] | None = None,
                   announce: Callable[[], None] | None = None, **_: Any) -> None:
    """Stands in for MLflow's ``_exec_cmd`` when it starts the web server: ``announce`` (the
    address, once the server answers), then become that server."""
    if announce is not None:
        announce()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, {**os.environ, **(extra_env or {})})


def serve_ui(host: str = "127.0.0.1", port: int = UI_PORT, tracking_uri: str | None = None,
             echo: Callable[[str], None] = log.info, allowed_hosts: str | None = None) -> int:
    """Serve the MLflow UI for the resolved store on ``host:port`` (127.0.0.1 unless told
    otherwise; ``allowed_hosts``: see ``allowed_hosts_for``). This process *becomes* the server
    (see the module docstring) and does not return unless MLflow refuses to start (its exit code);
    the address of the newest experiment's training view goes to ``echo`` (the CLI passes
    ``print``) once the server answers, from a process of its own (``_announce_in_background``)."""
    uri = resolve_tracking_uri(tracking_uri)
    if urlparse(uri).scheme in ("http", "https"):
        raise UsageError(f"tracking URI {uri} is already a server: open it in a browser")
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: not a port number (1-65535)")
    check_store(uri)
    _check_listen(host, port)
    args = server_args(host, port, uri, allowed_hosts)
    hosts = args[args.index("--allowed-hosts") + 1].split(",") if "--allowed-hosts" in args else []

    import mlflow.server
    from mlflow.cli import server

    os.environ.update(SERVER_ENV)
    # MLflow's own import of a deprecated Starlette module warns on every start (two lines a user can do nothing about)
    os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), QUIET_WARNINGS) if w)
    line = f"MLflow UI for {uri}: {ui_address(host, port, newest_experiment(uri), hosts)}  (Ctrl-C to stop)"
    announce = functools.partial(_announce_in_background, health_url(host, port), line, echo)
    # the one hook: MLflow's server starts its web server here
    mlflow.server._exec_cmd = functools.partial(_exec_in_place, announce=announce)
    try:
        server.main(args=args, prog_name="segpipe ui", standalone_mode=False)
    except KeyboardInterrupt:
        return 0
    except SystemExit as e:  # MLflow logs why, then exits
        if not e.code:
            return 0
        raise UsageError(f"MLflow server did not start for {uri} (exit code {e.code}; its messages are above)") from None
    except Exception as e:  # noqa: BLE001 - click/MLflow refusing the arguments or the store
        raise UsageError(f"MLflow server did not start: {e}") from None
    return 1  # only reached if MLflow no longer starts its server through _exec_cmd
