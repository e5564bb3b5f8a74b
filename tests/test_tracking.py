"""MLflow tracking against a real store and a real ``segpipe ui`` server on 127.0.0.1: a training
logs there (metrics in sections, per-epoch QC images, progress.png, dataset input, system
metrics, a registered model that loads back and predicts, evaluation found from the output
folder); a server that stops mid-run does not stop training and the records stay local; a server
that comes back gets them replayed; `segpipe ui` prints the training view, stays one light
process and leaves nothing behind on SIGTERM."""

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
from pipeline.tracking import RunTracker, mlflow_key
from pipeline.train import train_bundle
from pipeline.ui import newest_experiment, serve_ui, server_command

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "phantom_ct_3d"
FAST = {"pixdim": [1.6, 1.6, 2.5], "roi_size": [16, 16, 12], "network_def#features": [8, 16, 32, 8],
        "num_workers": 0, "num_folds": 3, "batch_size": 2, "num_samples": 1, "val_interval": 1}
SECTIONS = {"train", "val", "perf", "system"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], port: int, cwd: Path, stdout: object = subprocess.DEVNULL) -> subprocess.Popen:
    """Start a server in its own process group and wait for MLflow's /health."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=stdout, stderr=subprocess.DEVNULL, start_new_session=True)
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
def ui_server(store: Path) -> Iterator[SimpleNamespace]:
    """`segpipe ui` itself, on a free port, serving the module's SQLite store (``url``, ``port``,
    ``proc``, and ``stdout``: the file holding what it printed). The module's last test stops it."""
    port = _free_port()
    stdout = store.parent / f"ui-{port}.txt"
    with stdout.open("w") as f:
        proc = _start([sys.executable, "-m", "pipeline", "ui", "--port", str(port), "--tracking-uri",
                       f"sqlite:///{store}"], port, store.parent, stdout=f)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, proc=proc, stdout=stdout)
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
    from pipeline.manifest import write_splits

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


# keep last: it stops the module's `segpipe ui`
def test_ui_prints_the_training_view_is_one_light_process_and_sigterm_leaves_nothing(ui_server: SimpleNamespace) -> None:
    printed = ui_server.stdout.read_text().splitlines()[0]
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
