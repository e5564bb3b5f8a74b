"""MLflow tracking against a real store and a real ``segpipe ui`` server on 127.0.0.1: a training
logs there (metrics in sections, per-epoch QC images, progress.png, dataset input, system
metrics, a registered model that loads back and predicts, evaluation found from the output
folder); a server that stops mid-run does not stop training and the records stay local; a server
that comes back gets them replayed; `segpipe ui` prints the training view, stays one light
process and leaves nothing behind on SIGTERM, answers the host names it is told to; records an
outage left unsent reach MLflow on a --resume, once; store URIs are absolute, missing or
refused stores are one line."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoints import list_checkpoints
from pipeline.errors import UsageError
from pipeline.manifest import manifest_hash
from pipeline.tracking import RunTracker, mlflow_key, open_tracker
from pipeline.tracking_store import artifact_location, resolve_tracking_uri, run_address
from pipeline.train import train_bundle
from pipeline.ui import newest_experiment, serve_ui, server_args, server_command

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "phantom_ct_3d"
FAST = {"pixdim": [1.6, 1.6, 2.5], "roi_size": [16, 16, 12], "network_def#features": [8, 16, 32, 8],
        "num_workers": 0, "num_folds": 3, "batch_size": 2, "num_samples": 1, "val_interval": 1}
SECTIONS = {"train", "val", "perf", "system"}
#: the name `segpipe ui` is told to answer to besides localhost (as a server reached from elsewhere)
UI_NAME = "gpu-node-7.hospital.test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], port: int, cwd: Path, stdout: object = subprocess.DEVNULL,
           proc: subprocess.Popen | None = None) -> subprocess.Popen:
    """Start a server in its own process group (or take ``proc``, started) and wait for MLflow's /health."""
    proc = proc or subprocess.Popen(cmd, cwd=cwd, stdout=stdout, stderr=subprocess.DEVNULL, start_new_session=True)
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
    """One SQLite store for the servers of this module (MLflow creates its tables once, here:
    `segpipe ui` serves stores that exist)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def ui_server(store: Path) -> Iterator[SimpleNamespace]:
    """`segpipe ui` itself, on a free port, serving the module's SQLite store (``url``, ``port``,
    ``proc``, and ``stdout``: the file holding what it printed). The module's last test stops it."""
    port = _free_port()
    stdout, stderr = store.parent / f"ui-{port}.txt", store.parent / f"ui-{port}.err"
    with stdout.open("w") as f, stderr.open("w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--port", str(port), "--tracking-uri",
                                 f"sqlite:///{store}", "--allowed-hosts", UI_NAME], cwd=store.parent, stdout=f,
                                stderr=e, start_new_session=True)
    answered_when_printed = None  # whether /health answered as soon as the address was there to read
    deadline = time.monotonic() + 120
    while answered_when_printed is None and time.monotonic() < deadline and proc.poll() is None:
        if "MLflow UI for" in stdout.read_text():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    answered_when_printed = r.status == 200
            except OSError:
                answered_when_printed = False
        time.sleep(0.05)
    if answered_when_printed is None:
        _stop(proc)
        raise RuntimeError(f"segpipe ui on port {port} printed no address")
    _start([], port, store.parent, proc=proc)  # (it answers /health)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, proc=proc, stdout=stdout, stderr=stderr,
                          answered_when_printed=answered_when_printed)
    _stop(proc)


def test_tracker_journals_every_record_and_logs_to_a_store(tmp_path: Path, store: Path) -> None:
    uri = f"sqlite:///{store}"
    t = RunTracker(uri, "exp", tmp_path / "metrics.jsonl")
    t.log_params({"lr": 0.01, "roi": [16, 16, 12]})
    t.set_tags({"bundle": "x"})
    t.log_metrics({"train_loss": 1.5}, step=1)
    t.log_metrics({"train_loss": 1.0, "val_dice_liver": 0.5}, step=2)
    (tmp_path / "a.csv").write_text("case,dice\n")
    t.log_artifact(tmp_path / "a.csv", "validation")
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "qc.png")
    t.log_image(tmp_path / "qc.png", "qc/case 1", step=2)
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "toy", "labels": {"0": "background"}, "training": []}))
    t.log_dataset(tmp_path / "dataset.json", "0123456789abcdef")
    info = t.finish()
    assert info["tracking_ok"] and info["mlflow_run_id"]
    client = MlflowClient(uri)
    run = client.get_run(info["mlflow_run_id"])
    assert run.data.params == {"lr": "0.01", "roi": "[16, 16, 12]"} and run.data.tags["bundle"] == "x"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss_iteration")] == [1.5, 1.0]
    assert set(run.data.metrics) == {"train/loss_iteration", "val/dice_liver"}  # sections in MLflow ...
    assert [f.path for f in client.list_artifacts(run.info.run_id, "validation")] == ["validation/a.csv"]
    images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    assert len(images) == 2 and all(p.startswith("images/qc~case 1+step+2+") for p in images)  # PNG + thumbnail
    (dataset,) = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("toy", "0123456789abcdef")
    assert [(tag.key, tag.value) for tag in dataset.tags] == [("mlflow.data.context", "training")]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["param", "param", "tag", "metric", "metric", "metric", "artifact", "image",
                                            "dataset"]
    assert {r["key"] for r in records if r["kind"] == "metric"} == {"train_loss", "val_dice_liver"}  # ... flat here


def test_a_broken_run_record_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """``mlflow_run.json`` (written atomically since) that is not a run record stops a resumed
    training or cross-validation in one line naming it, before any MLflow call."""
    from pipeline.errors import InputError
    from pipeline.tracking import open_tracker

    run_file = tmp_path / "mlflow_run.json"
    run_file.write_text('{"run_id": "abc", "tracking')  # half a record, as a kill mid-write left it
    with pytest.raises(InputError, match="mlflow_run.json: not the record of an MLflow run"):
        open_tracker(None, "x", tmp_path / "metrics.jsonl", run_file, resume=True)


def test_metric_names_map_into_sections_and_bundle_names_stay() -> None:
    assert {mlflow_key(k) for k in ("train_loss", "train_loss_epoch", "lr")} == {
        "train/loss_iteration", "train/loss", "train/lr"}
    assert mlflow_key("val_mean_dice") == "val/mean_dice" and mlflow_key("val_dice_kidney_left") == "val/dice_kidney_left"
    assert mlflow_key("best_val_mean_dice") == "val/best_mean_dice" and mlflow_key("epoch_time_s") == "perf/epoch_time_s"
    assert mlflow_key("eval_hd95_liver") == "eval/hd95_liver"
    assert mlflow_key("system/cpu_utilization_percentage") == "system/cpu_utilization_percentage"
    assert mlflow_key("oof_mean_dice") == "oof_mean_dice"  # unknown names are kept


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data: Path, ui_server: SimpleNamespace) -> dict:
    """A 3-epoch training logged through `segpipe ui`, on a copy of the phantoms with
    fingerprint.json and splits.json beside the manifest; system metrics every second."""
    from pipeline.fingerprint import write_fingerprint
    from pipeline.splits import write_splits

    tmp = tmp_path_factory.mktemp("trained")
    shutil.copytree(data.parent, tmp / "data")
    manifest = tmp / "data" / "dataset.json"
    write_fingerprint(manifest)
    write_splits(manifest, k=3)
    fast = {k: v for k, v in FAST.items() if k != "val_interval"}  # the default: 3 epochs validate 3 times
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        s = train_bundle(BUNDLE, manifest=manifest, epochs=3, tracking_uri=ui_server.url,
                         overrides={**fast, "output_dir": str(tmp / "run")})
    return {"summary": s, "manifest": manifest, "tmp": tmp}


def test_training_logs_to_a_real_mlflow_server(trained: dict, ui_server: SimpleNamespace) -> None:
    s, manifest = trained["summary"], trained["manifest"]
    assert s["tracking_ok"] and s["tracking_uri"] == ui_server.url
    client = MlflowClient(ui_server.url)
    run = client.get_run(s["mlflow_run_id"])
    run_id, exp = run.info.run_id, run.info.experiment_id
    assert s["mlflow_run_view"] == f"{ui_server.url}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"
    assert run.info.status == "FINISHED" and run.data.params["network"] == "unet"
    assert run.data.params["val_interval"] == "1" and "fold0" in run.info.run_name
    # metrics in sections; steps: epochs, iterations only for the per-iteration loss
    assert {k.split("/")[0] for k in run.data.metrics} == SECTIONS
    assert {m.step for m in client.get_metric_history(run_id, "val/mean_dice")} == {1, 2, 3}
    assert {m.step for m in client.get_metric_history(run_id, "train/loss")} == {1, 2, 3}
    assert [m.step for m in client.get_metric_history(run_id, "train/loss_iteration")] == [1, 2, 3, 4, 5, 6]
    assert {"val/dice_kidney", "val/best_mean_dice", "perf/data_wait_fraction", "train/lr"} <= set(run.data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    # QC images per validation (step = epoch) and the reference alone at step 0, for each case
    steps: dict[str, set[int]] = {}
    for f in client.list_artifacts(run_id, "images"):
        key, _, step = re.match(r"images/(.+?)\+step\+(\d+)\+", f.path).group(1, 0, 2)
        steps.setdefault(key, set()).add(int(step))
    cases = [line.split(",")[0] for line in (Path(s["output_dir"]) / "val_cases.csv").read_text().splitlines()[1:]]
    assert steps == {f"qc~{c}": {0, 1, 2, 3} for c in cases} and run.data.tags["mlflow.loggedImages"] == "True"
    root = {f.path for f in client.list_artifacts(run_id)}
    assert "progress.png" in root and (Path(s["output_dir"]) / "progress.png").is_file()
    assert (Path(s["output_dir"]) / "qc" / "epoch_0003" / f"qc_{cases[0]}.png").is_file()
    # the manifest as the dataset input, its fingerprint and splits attached; MLflow's own tags
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == manifest_hash(manifest) and dataset.tags[0].value == "training"
    assert {f.path for f in client.list_artifacts(run_id, "dataset")} == {"dataset/fingerprint.json", "dataset/splits.json"}
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL" and len(tags["mlflow.source.git.commit"]) == 40
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/model.pt"]


def test_the_registered_model_loads_back_and_predicts(trained: dict, ui_server: SimpleNamespace, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    s = trained["summary"]
    client = MlflowClient(ui_server.url)
    (version,) = client.search_model_versions(f"run_id = '{s['mlflow_run_id']}'")
    assert version.name == "phantom_ct_3d" and "validation mean Dice" in version.description
    assert client.get_run(s["mlflow_run_id"]).outputs.model_outputs  # the run lists its logged model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ui_server.url)
    model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    case = trained["tmp"] / "data" / "imagesTr" / "ct_000.nii.gz"
    report = model.predict([str(case)], params={"output_dir": str(tmp_path / "masks")})
    assert list(report["status"]) == ["ok"]
    mask = nib.load(report["output"][0])
    assert mask.shape == nib.load(case).shape and report["study_id"][0] == "ct_000"


def test_evaluate_finds_the_training_run_from_its_output_folder(trained: dict, ui_server: SimpleNamespace,
                                                                 tmp_path: Path) -> None:
    from pipeline.cli import main
    from pipeline.predict import predict

    s, manifest = trained["summary"], trained["manifest"]
    m = json.loads(manifest.read_text())
    held_out = manifest.with_name("held_out.json")  # the reference set: two of the cases
    held_out.write_text(json.dumps({**m, "training": m["training"][:2], "numTraining": 2}))
    predict(BUNDLE, manifest.parent / "imagesTr", tmp_path / "masks", progress=False,
            overrides={"model_path": s["model_path"], **{k: FAST[k] for k in ("pixdim", "roi_size", "network_def#features")}})
    assert main(["evaluate", "--pred", str(tmp_path / "masks"), "--ref", str(held_out), "--run", s["output_dir"]]) == 0
    run = MlflowClient(ui_server.url).get_run(s["mlflow_run_id"])
    logged = set(run.data.metrics)
    assert {"eval/mean_dice", "eval/mean_hd95", "eval/dice_liver", "eval/nsd_liver"} <= logged
    assert any(k.startswith("eval/hd95_") for k in logged)  # per class where defined (3 epochs may miss an organ)
    client = MlflowClient(ui_server.url)
    assert "evaluation/metrics_summary.png" in {f.path for f in client.list_artifacts(s["mlflow_run_id"], "evaluation")}
    assert any(f.path.startswith("images/eval~summary+step+0+") for f in client.list_artifacts(s["mlflow_run_id"], "images"))
    inputs = {d.tags[0].value: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert inputs == {"training": manifest_hash(manifest), "evaluation": manifest_hash(held_out)}
    assert main(["evaluate", "--pred", str(tmp_path / "masks"), "--ref", str(held_out), "--run", str(tmp_path)]) == 1


@pytest.mark.slow  # a second mlflow server and a training subprocess
def test_server_stopped_mid_run_does_not_stop_training(tmp_path: Path, data: Path, store: Path,
                                                       ui_server: SimpleNamespace) -> None:
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
def test_records_are_replayed_when_the_server_comes_back(tmp_path: Path, store: Path,
                                                         ui_server: SimpleNamespace) -> None:
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
        assert [m.step for m in client.get_metric_history(info["mlflow_run_id"], "train/loss_iteration")] == [1, 2]
        run = client.get_run(info["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.01"}
    finally:
        _stop(server)


def test_ui_refuses_a_server_uri_and_binds_localhost_by_default() -> None:
    with pytest.raises(UsageError, match="already a server"):
        serve_ui(tracking_uri="http://127.0.0.1:5000")
    assert server_command("127.0.0.1", 5000, "sqlite:///x.db")[4:8] == ["--host", "127.0.0.1", "--port", "5000"]


@pytest.fixture
def mlflow_main(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """MLflow's ``server`` command replaced by one that records its arguments (``serve_ui`` then
    returns 1); what ``serve_ui`` changes in this process is put back afterwards."""
    import mlflow.server
    from mlflow.cli import server

    import pipeline.ui

    calls: list[list[str]] = []

    def main(args: list[str], **_: object) -> None:  # records its arguments, starts the "web server"
        calls.append(args)
        mlflow.server._exec_cmd(["uvicorn"], extra_env={})

    monkeypatch.setattr(server, "main", main)
    monkeypatch.setattr(mlflow.server, "_exec_cmd", mlflow.server._exec_cmd)
    monkeypatch.setattr(pipeline.ui.os, "execve", lambda *args: None)  # this process stays itself
    # the address is said at once (a forked process waits for the server to answer: no server here)
    monkeypatch.setattr(pipeline.ui, "_announce_in_background", lambda url, line, echo: echo(line), raising=False)
    monkeypatch.setattr(pipeline.ui, "newest_experiment", lambda uri: "3")
    for key in pipeline.ui.SERVER_ENV:
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.delenv("MLFLOW_SERVER_ALLOWED_HOSTS", raising=False)
    monkeypatch.delenv("MLFLOW_SERVER_CORS_ALLOWED_ORIGINS", raising=False)
    return calls


def _option(args: list[str], name: str) -> list[str] | None:
    return args[args.index(name) + 1].split(",") if name in args else None


def test_ui_on_all_interfaces_answers_this_machine_by_name(tmp_path: Path, mlflow_store: str,
                                                          mlflow_main: list[list[str]],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow answers only localhost and private IPs unless told (--allowed-hosts), and refuses the
    UI's own posts from another origin: on 0.0.0.0 `segpipe ui` allows this machine's names and
    addresses and their origins, and prints an address with its name (not 0.0.0.0)."""
    import pipeline.ui

    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-node-7")
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "gpu-node-7.hospital.test")
    monkeypatch.setattr(pipeline.ui, "_check_listen", lambda host, port: None)  # binds nothing but 127.0.0.1 here
    MlflowClient(mlflow_store).search_experiments()  # the store exists
    printed: list[str] = []
    assert serve_ui("0.0.0.0", 5123, mlflow_store, echo=printed.append) == 1
    (args,) = mlflow_main
    assert args[:4] == ["--host", "0.0.0.0", "--port", "5123"]
    hosts, origins = _option(args, "--allowed-hosts"), _option(args, "--cors-allowed-origins")
    assert {"gpu-node-7.hospital.test:5123", "gpu-node-7:5123", "localhost:*", "127.0.0.1:*", "10.*"} <= set(hosts)
    assert {"http://gpu-node-7.hospital.test:5123", "http://gpu-node-7:5123"} <= set(origins)
    assert "http://10.*" not in origins  # the UI's own origins, not every private address
    assert "http://gpu-node-7.hospital.test:5123/#/experiments/3/runs?workflowType=machine_learning" in printed[0]
    # a loopback --host keeps MLflow's defaults; --allowed-hosts is passed on, with localhost
    assert _option(server_args("127.0.0.1", 5123, mlflow_store), "--allowed-hosts") is None
    args = server_args("127.0.0.1", 5123, mlflow_store, "mlflow.example.org,10.1.*")
    assert _option(args, "--allowed-hosts")[-3:] == ["mlflow.example.org", "mlflow.example.org:5123", "10.1.*"]
    assert "localhost:*" in args[-3]
    assert _option(args, "--cors-allowed-origins") == ["http://mlflow.example.org:5123", "http://10.1.*"]
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", "mine.example")  # MLflow's own setting stands
    assert _option(server_args("0.0.0.0", 5123, mlflow_store), "--allowed-hosts") is None


def test_ui_refuses_a_missing_store_or_a_file_store_in_one_line(tmp_path: Path, mlflow_main: list[list[str]],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow would create an empty database (and its folder) and serve it; a file store it
    refuses with a traceback and exits: both are one line before MLflow runs."""
    with pytest.raises(UsageError, match=r"no MLflow store at .*none.*--tracking-uri"):
        serve_ui(tracking_uri=f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}")
    assert not (tmp_path / "none").exists()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UsageError, match="no MLflow store at"):
        serve_ui()  # MLflow's default, ./mlflow.db
    assert not (tmp_path / "mlflow.db").exists()
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    (tmp_path / "mlruns" / "0" / "meta.yaml").write_text('experiment_id: "0"\nname: Default\nlifecycle_stage: active\n')
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(UsageError, match=r"is a file store.*mlflow migrate-filestore --source .*mlruns") as e:
        serve_ui(tracking_uri="./mlruns")
    assert "\n" not in str(e.value) and not mlflow_main
    (tmp_path / "mlruns").rename(tmp_path / "old_mlruns")
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # the default store, made
    assert serve_ui(port=_free_port(), echo=lambda line: None) == 1
    assert _option(mlflow_main[0], "--backend-store-uri") == [f"sqlite:///{tmp_path / 'mlflow.db'}"]


def test_ui_refuses_a_store_that_is_no_database_or_an_unknown_scheme_in_one_line_at_once(
        tmp_path: Path, mlflow_main: list[list[str]]) -> None:
    """A folder or a text file named as the SQLite database had MLflow retry for minutes, print the
    address as if started, then pages of tracebacks; an unknown scheme, tracebacks too. A plain
    path to a SQLite database is named so (not taken for a file store to migrate onto itself)."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "x.db").write_text("not a database\n")
    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    refused = {f"sqlite:///{tmp_path / 'adir'}": r"adir .*is a folder, not a SQLite database",
               f"sqlite:///{tmp_path / 'x.db'}": r"x\.db .*is not a SQLite database",
               "foo://bar": r"foo://bar: unknown scheme foo://",
               str(db): rf"{db} is a SQLite database, not a file store: use --tracking-uri sqlite:///{db}$",
               str(tmp_path / "x.db"): r"x\.db is a file, neither a SQLite database nor an MLflow file store"}
    for uri, message in refused.items():
        printed: list[str] = []
        started = time.monotonic()
        with pytest.raises(UsageError, match=message) as e:
            serve_ui(port=_free_port(), tracking_uri=uri, echo=printed.append)
        assert time.monotonic() - started < 10 and "\n" not in str(e.value), uri
        assert e.value.exit_code == 2 and not printed and not mlflow_main, uri
    empty = tmp_path / "empty.db"
    empty.touch()  # SQLite's new database: MLflow makes its tables there
    assert serve_ui(port=_free_port(), tracking_uri=f"sqlite:///{empty}", echo=lambda line: None) == 1


def test_a_plain_path_to_a_sqlite_database_is_refused_alike_by_training(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    t = RunTracker(str(db), "plain", tmp_path / "metrics.jsonl")
    assert t.refused == f"{db} is a SQLite database, not a file store: use --tracking-uri sqlite:///{db}"
    assert not t.finish()["tracking_ok"]


def test_the_ui_address_waits_for_the_server_to_answer(tmp_path: Path) -> None:
    """Said once the server answers (any status), nothing when the server's process ends first."""
    import http.server
    import threading

    from pipeline.ui import announce_when_answering, health_url

    assert health_url("0.0.0.0", 5000) == "http://127.0.0.1:5000/health"
    assert health_url("::", 5000) == "http://[::1]:5000/health"
    port = _free_port()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    printed: list[str] = []
    assert not announce_when_answering(f"http://127.0.0.1:{port}/health", "address", printed.append, gone.pid)
    assert not printed
    server = http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert announce_when_answering(f"http://127.0.0.1:{port}/health", "address", printed.append, os.getpid())
    finally:
        server.shutdown()
        server.server_close()
    assert printed == ["address"]


def test_a_file_store_warning_says_the_records_stay_local_and_a_resume_into_a_database_sends_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    journal, run_file = tmp_path / "metrics.jsonl", tmp_path / "mlflow_run.json"
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        t = open_tracker(str(tmp_path / "mlruns"), "fs", journal, run_file, resume=False)
        t.log_metrics({"val_mean_dice": 0.5}, step=1)
        t.flush()
        assert not t.finish()["tracking_ok"]
    first = caplog.records[0].getMessage()
    assert "is a file store" in first and "mlflow migrate-filestore" in first and "if the server is back" not in first
    assert "sent at the end" not in " ".join(r.getMessage() for r in caplog.records)
    assert not (tmp_path / "mlruns").exists()  # not a call to MLflow
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the store migrated (here: a new one); the training resumed
    t = open_tracker(uri, "fs", journal, run_file, resume=True)
    assert t.finish()["tracking_ok"]
    assert [m.value for m in MlflowClient(uri).get_metric_history(t.run_id, "val/mean_dice")] == [0.5]


def test_store_uris_are_absolute_so_a_run_is_found_from_any_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative ``sqlite:///mlflow.db`` saved in mlflow_run.json pointed, from another folder, at
    another (new, empty) database: a resume or `segpipe evaluate --run` there missed the run."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert resolve_tracking_uri("sqlite:///mlflow.db?timeout=20") == f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}?timeout=20"
    # a query string is no part of the database path: artifacts go beside the database
    assert artifact_location(resolve_tracking_uri("sqlite:///mlflow.db?timeout=20"), "e") == (
        tmp_path / "a" / "mlartifacts" / "e").as_uri()
    assert resolve_tracking_uri("file:./mlruns") == (tmp_path / "a" / "mlruns").as_uri()
    assert resolve_tracking_uri("mlruns") == str(tmp_path / "a" / "mlruns")
    for kept in ("sqlite:////abs/mlflow.db", "sqlite:///:memory:", "http://127.0.0.1:5000", "postgresql://u@h/db"):
        assert resolve_tracking_uri(kept) == kept
    journal, run_file = tmp_path / "a" / "metrics.jsonl", tmp_path / "a" / "mlflow_run.json"
    t = open_tracker("sqlite:///mlflow.db", "rel", journal, run_file, resume=False)
    t.log_metrics({"val_mean_dice": 0.1}, step=1)
    info = t.finish()
    absolute = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    assert info["tracking_uri"] == absolute and json.loads(run_file.read_text())["tracking_uri"] == absolute
    monkeypatch.chdir(tmp_path / "b")
    from pipeline.evaluation import check_run, find_training_run

    run_id, uri = find_training_run(str(tmp_path / "a"))
    assert (run_id, uri) == (info["mlflow_run_id"], absolute)
    check_run(run_id, uri)  # found from b
    t = open_tracker(absolute, "rel", journal, run_file, resume=True)  # the store as the summary names it
    t.log_metrics({"val_mean_dice": 0.2}, step=2)
    assert t.run_id == info["mlflow_run_id"] and t.finish()["tracking_ok"]
    assert not (tmp_path / "b" / "mlflow.db").exists()


def test_the_ui_command_printed_for_a_run_can_be_pasted_into_a_shell() -> None:
    import shlex

    address = run_address("sqlite:////data/my store/mlflow.db", "1", "abc")
    command = address.split(", then ")[0]
    # the venv's segpipe by its absolute path: the command works from any folder, venv active or not
    assert shlex.split(command) == [str(Path(sys.executable).absolute().parent / "segpipe"), "ui", "--tracking-uri",
                                    "sqlite:////data/my store/mlflow.db"]
    assert address.endswith("http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning")


def test_a_resume_sends_again_only_what_the_run_lacks(tmp_path: Path, mlflow_store: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Records after the sent marker (here: all, as if a kill came between the sends and the
    marker) are sent again on a resume without a second copy of anything MLflow holds."""
    from PIL import Image

    journal, run_file = tmp_path / "metrics.jsonl", tmp_path / "mlflow_run.json"
    (tmp_path / "a.csv").write_text("case,dice\n")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "qc.png")
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "toy", "training": []}))
    t = open_tracker(mlflow_store, "again", journal, run_file, resume=False)
    t.log_params({"lr": 0.01})
    t.set_tags({"bundle": "x"})
    t.log_metrics({"train_loss": 1.5}, step=1)
    t.log_metrics({"train_loss": 1.0}, step=2)
    t.log_artifact(tmp_path / "a.csv", "validation")
    t.log_image(tmp_path / "qc.png", "qc/case 1", step=2)
    t.log_dataset(tmp_path / "dataset.json", "0123456789abcdef")
    assert t.finish()["tracking_ok"]
    marker = tmp_path / "metrics.jsonl.sent"
    assert json.loads(marker.read_text()) == {"run_id": t.run_id, "offset": journal.stat().st_size}
    assert open_tracker(mlflow_store, "again", journal, run_file, resume=True).pending == []  # all sent
    marker.unlink()
    with caplog.at_level(logging.INFO, logger="pipeline.tracking"):  # as training resumes: at epoch 2
        t2 = open_tracker(mlflow_store, "again", journal, run_file, resume=True, resumed_at=(2, 2))
    assert t2.run_id == t.run_id and len(t2.pending) == 7
    assert caplog.text.count("7 records of") == 1 and "sent again" in caplog.text  # said once, not twice
    assert t2.finish()["tracking_ok"]
    client = MlflowClient(mlflow_store)
    run = client.get_run(t.run_id)
    assert [m.value for m in client.get_metric_history(t.run_id, "train/loss_iteration")] == [1.5, 1.0]
    assert run.data.params == {"lr": "0.01"} and len(run.inputs.dataset_inputs) == 1
    assert len(client.list_artifacts(t.run_id, "images")) == 2  # the PNG and its thumbnail, once
    assert [f.path for f in client.list_artifacts(t.run_id, "validation")] == ["validation/a.csv"]
    assert json.loads(marker.read_text())["offset"] == journal.stat().st_size


@pytest.mark.slow  # two mlflow server starts
def test_a_run_made_once_the_server_is_back_is_recorded_for_resume(tmp_path: Path, store: Path) -> None:
    """The server is down when training starts and back at the end: the run made then is saved in
    the run file, so a --resume continues it instead of starting another."""
    port = _free_port()
    uri, cmd = f"http://127.0.0.1:{port}", server_command("127.0.0.1", port, f"sqlite:///{store}", tmp_path / "art")
    journal, run_file = tmp_path / "metrics.jsonl", tmp_path / "mlflow_run.json"
    t = open_tracker(uri, "late", journal, run_file, resume=False)
    t.log_metrics({"val_mean_dice": 0.1}, step=1)
    t.flush()
    assert t.run_id is None and not run_file.exists()
    server = _start(cmd, port, tmp_path)
    try:
        info = t.finish()  # retries once: the run is made and every record sent
        assert info["tracking_ok"] and json.loads(run_file.read_text())["run_id"] == t.run_id
        resumed = open_tracker(uri, "late", journal, run_file, resume=True)
        assert resumed.run_id == t.run_id and resumed.finish()["tracking_ok"]
        history = MlflowClient(uri).get_metric_history(t.run_id, "val/mean_dice")
        assert [(m.step, m.value) for m in history] == [(1, 0.1)]
    finally:
        _stop(server)


def test_records_an_outage_left_unsent_reach_mlflow_on_resume(tmp_path: Path, store: Path,
                                                              ui_server: SimpleNamespace) -> None:
    """The server goes away mid-run and is back for the resume: the run gets every record once
    and ends FINISHED (it stayed RUNNING with only the records sent before the outage)."""
    from PIL import Image

    port = _free_port()
    uri, cmd = f"http://127.0.0.1:{port}", server_command("127.0.0.1", port, f"sqlite:///{store}", tmp_path / "art")
    journal, run_file = tmp_path / "metrics.jsonl", tmp_path / "mlflow_run.json"
    Image.new("RGB", (40, 30), "red").save(tmp_path / "qc.png")
    (tmp_path / "a.csv").write_text("case,dice\n")
    server = _start(cmd, port, tmp_path)
    try:
        t = open_tracker(uri, "outage", journal, run_file, resume=False)
        t.log_params({"lr": 0.01})
        t.log_metrics({"val_mean_dice": 0.1}, step=1)
        t.flush()
    finally:
        _stop(server)  # mid-run
    t.log_metrics({"val_mean_dice": 0.2}, step=2)
    t.log_image(tmp_path / "qc.png", "qc/case", step=2)
    t.flush()
    t.log_metrics({"val_mean_dice": 0.3}, step=3)
    t.log_artifact(tmp_path / "a.csv", "validation")
    assert not t.finish()["tracking_ok"]
    server = _start(cmd, port, tmp_path)
    try:
        for _ in range(2):  # the second resume has nothing left to send
            resumed = open_tracker(uri, "outage", journal, run_file, resume=True)
            resumed.log_params({"lr": 0.01})  # as a resumed training logs them again
            assert resumed.run_id == t.run_id and resumed.finish()["tracking_ok"]
        client = MlflowClient(uri)
        history = client.get_metric_history(t.run_id, "val/mean_dice")
        assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
        run = client.get_run(t.run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.01"}
        assert len(client.list_artifacts(t.run_id, "images")) == 2
        assert [f.path for f in client.list_artifacts(t.run_id, "validation")] == ["validation/a.csv"]
    finally:
        _stop(server)


def test_newest_experiment_is_the_one_with_the_newest_run(tmp_path: Path) -> None:
    """Its own store: the module's is shared with tests that add runs in any order."""
    uri = f"sqlite:///{tmp_path / 'own.db'}"
    client = MlflowClient(uri)
    assert newest_experiment(uri) == "0"  # only MLflow's Default, without runs
    RunTracker(uri, "older", tmp_path / "older.jsonl").finish()
    RunTracker(uri, "newer", tmp_path / "newer.jsonl").finish()
    assert newest_experiment(uri) == client.get_experiment_by_name("newer").experiment_id
    time.sleep(0.01)  # start times are in milliseconds
    RunTracker(uri, "older", tmp_path / "older2.jsonl").finish()  # a new run in the older experiment
    assert newest_experiment(uri) == client.get_experiment_by_name("older").experiment_id
    client.create_experiment("empty")  # newest by creation, but without runs
    assert newest_experiment(uri) == client.get_experiment_by_name("older").experiment_id


def test_ui_answers_the_host_names_it_is_told_and_the_ui_posts_from_them(ui_server: SimpleNamespace) -> None:
    """`segpipe ui --allowed-hosts NAME` on 127.0.0.1 (tests serve nothing else): requests that
    name it (as a browser on another machine does) are answered, the UI's own posts from it too;
    other names are refused (MLflow's DNS rebinding guard), localhost still answered."""
    import http.client

    def request(host: str, method: str = "GET", origin: str | None = None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", ui_server.port, timeout=30)
        headers = {"Host": f"{host}:{ui_server.port}", "Content-Type": "application/json"}
        if origin:
            headers["Origin"] = origin
        if method == "GET":
            conn.request("GET", "/ajax-api/2.0/mlflow/experiments/search?max_results=5", headers=headers)
        else:
            conn.request("POST", "/ajax-api/2.0/mlflow/runs/search", body=json.dumps({"experiment_ids": ["0"]}),
                         headers=headers)
        try:
            return conn.getresponse().status
        finally:
            conn.close()

    assert request(UI_NAME) == 200 and request("127.0.0.1") == 200 and request("localhost") == 200
    assert request("evil.example") == 403
    assert request(UI_NAME, "POST", origin=f"http://{UI_NAME}:{ui_server.port}") == 200
    assert request(UI_NAME, "POST", origin="http://evil.example") == 403


# keep last: it stops the module's `segpipe ui`
def test_ui_prints_the_training_view_is_one_light_process_and_sigterm_leaves_nothing(ui_server: SimpleNamespace) -> None:
    assert ui_server.answered_when_printed  # the address was printed once the server answered, not before
    printed, said = ui_server.stdout.read_text(), ui_server.stderr.read_text()
    assert "Registry store URI not provided" not in printed + said and "DeprecationWarning" not in said, said
    found = re.search(rf"http://127\.0\.0\.1:{ui_server.port}/#/experiments/(\d+)/runs\?workflowType=machine_learning",
                      printed)
    assert found, printed  # MLflow 3's model-training view, not its GenAI home
    with urllib.request.urlopen(f"{ui_server.url}/ajax-api/2.0/mlflow/experiments/get?experiment_id={found.group(1)}") as r:
        assert json.load(r)["experiment"]["experiment_id"] == found.group(1)
    server = psutil.Process(ui_server.proc.pid)
    tree = [server, *server.children(recursive=True)]
    assert len(tree) == 1, [" ".join(p.cmdline()[:4]) for p in tree]  # no job runner, no huey consumers, no CLI parent
    assert sum(p.memory_info().rss for p in tree) < 400 * 2**20  # idle, after serving a training
    os.kill(ui_server.proc.pid, signal.SIGTERM)  # to the process alone, not its group
    ui_server.proc.wait(timeout=30)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", ui_server.port)) != 0  # nothing listens any more
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_tracker_on_a_store_that_is_no_database_says_so_at_once(tmp_path: Path) -> None:
    """A ``sqlite:///`` path that is a folder: MLflow retried for minutes before failing; the
    tracker now refuses it at once (training goes on, records kept in its journal)."""
    folder = tmp_path / "adir"
    folder.mkdir()
    t0 = time.monotonic()
    tracker = RunTracker(f"sqlite:///{folder}", "exp", tmp_path / "run" / "metrics.jsonl")
    assert time.monotonic() - t0 < 15
    assert tracker.offline and tracker.refused.startswith(f"{folder} (sqlite:///{folder}) is a folder")
    tracker.log_metrics({"val_mean_dice": 0.5}, step=1)
    assert not tracker.finish()["tracking_ok"]
    assert '"val_mean_dice"' in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_nan_metric_mlflow_holds_is_not_sent_again(tmp_path: Path) -> None:
    """An undefined HD95 is logged as NaN; a replay compared values with ==, which NaN never is, so
    every resume sent the point again."""
    from pipeline.tracking_replay import drop_held

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("nan")).info.run_id
    client.log_metric(run_id, "oof/hd95_mm_liver", float("nan"), timestamp=1000, step=0)
    record = {"kind": "metric", "key": "oof/hd95_mm_liver", "value": float("nan"), "step": 0, "ts": 1000,
              "_off": 0, "_replay": True}
    assert drop_held(client, run_id, [record], {}) == []
    other = {**record, "value": 3.5}
    assert drop_held(client, run_id, [other], {}) == [{k: v for k, v in other.items() if k != "_replay"}]


def test_a_kill_during_an_mlflow_write_lands_after_it(tmp_path: Path) -> None:
    """SIGTERM arriving inside an MLflow call is acted on once the call has returned (the call
    completes, then ``Terminated`` is raised between writes), so a killed run's store session is
    whole and ``finish("KILLED")`` can still mark it; outside a call the signal acts at once."""
    import os
    import signal

    from pipeline.errors import Terminated
    from pipeline.tracking import RunTracker

    def _terminate(signum: int, frame: object) -> None:
        raise Terminated

    done: list[str] = []

    def write() -> None:  # an MLflow call that a SIGTERM hits half-way
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # Python acts on a pending signal between bytecodes: give it the chance
            time.sleep(0.001)
        done.append("written")

    old = signal.signal(signal.SIGTERM, _terminate)
    try:
        tracker = RunTracker.__new__(RunTracker)
        tracker.offline, tracker._warned = False, False
        with pytest.raises(Terminated):
            tracker._call(write)
        assert done == ["written"]  # the write finished before the kill took effect
        assert signal.getsignal(signal.SIGTERM) is _terminate  # the handler is back
    finally:
        signal.signal(signal.SIGTERM, old)
