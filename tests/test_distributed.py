"""The same entry point under ``torchrun``: two real CPU processes (gloo) train one model, reduce
validation Dice over both shards, and only rank 0 writes checkpoints and logs to MLflow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "phantom_ct_3d"
FAST = {"pixdim": [1.6, 1.6, 2.5], "roi_size": [16, 16, 12], "network_def#features": [8, 16, 32, 8],
        "num_workers": 0, "num_folds": 3, "batch_size": 2, "num_samples": 1, "val_interval": 1, "qc_cases": 0}


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_two_process_torchrun_trains_and_logs_once(tmp_path: Path, ct6_dataset: Path) -> None:
    data = ct6_dataset  # 4 train, 2 val; a store of its own: it counts the experiment's runs
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [a for k, v in {**FAST, "output_dir": str(out), "qc_cases": 2}.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "pipeline", "train", str(BUNDLE),
                           "--manifest", str(data), "--epochs", "2", "--tracking-uri", uri, *sets],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-9000:]
    assert proc.stderr.count("distributed: rank") == 2 and "(gloo)" in proc.stderr

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("phantom_ct_3d").experiment_id])
    assert len(runs) == 1  # rank 0 only
    run_id = runs[0].info.run_id
    # each rank: 2 of the 4 training cases per epoch, batch 2 -> 1 iteration; logged once per iteration
    assert [m.step for m in client.get_metric_history(run_id, "train/loss_iteration")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "val/mean_dice")] == [1, 2]
    assert runs[0].data.tags["world_size"] == "2"
    # validation Dice covers both ranks' shards: both validation cases are in the per-case CSV
    assert len((out / "val_cases.csv").read_text().splitlines()) == 1 + 2
    # the QC pictures too: each rank validates one of the two cases, and both are drawn (rank 0 drew its own only)
    cases = sorted(line.split(",")[0] for line in (out / "val_cases.csv").read_text().splitlines()[1:])
    assert sorted(p.name for p in (out / "qc" / "epoch_0002").glob("qc_*.png")) == [f"qc_{c}.png" for c in cases]
    ckpt = torch.load(out / "checkpoints" / "checkpoint_2.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped from DDP
    assert set(torch.load(out / "model.pt", weights_only=True)) == set(ckpt["model"])


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_a_time_budget_under_torchrun_stops_every_rank_at_one_iteration(tmp_path: Path, ct6_dataset: Path) -> None:
    """Rank 0 starts its clock later (it opens MLflow first): on its own clock each rank reached the
    budget at another iteration, and the one that stopped left the other waiting in DDP's gradient
    all-reduce (a hang until gloo's 30-minute timeout). One clock, the slowest rank's: both stop."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {**FAST, "output_dir": str(out), "time_budget_min": 0.03, "batch_size": 1, "val_interval": 50}
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "pipeline", "train", str(BUNDLE),
                           "--manifest", str(ct6_dataset), "--epochs", "500", "--tracking-uri", uri, *sets],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-9000:]
    assert proc.stderr.count("time budget of") == 2  # each rank, at the same epoch
    summary = json.loads(proc.stdout)  # one summary on stdout (rank 0's), not one per rank
    assert summary["epochs"] < 500 and summary["mlflow_run_id"]
    assert (out / "model.pt").is_file()  # the last epoch was validated


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_torchrun_without_validation_cases_trains_and_with_too_few_says_so(tmp_path: Path, ct6_dataset: Path) -> None:
    """``num_folds`` 1 (every case trains, none validates) runs under torchrun as on one process;
    fewer validation cases than processes (here 1 for 2: fold 1 of 5) is one line saying what
    to change, before any folder is made. Before, both failed deep in MONAI's sampler ("the dataset
    length is less than the number of participating ranks"), leaving an empty checkpoints folder."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = {}
    for folds in (1, 5):
        out = tmp_path / f"folds{folds}"
        sets = [a for k, v in {**FAST, "num_folds": folds, "fold": 1, "output_dir": str(out)}.items()
                for a in ("--set", f"{k}={json.dumps(v)}")]
        results[folds] = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "pipeline", "train", str(BUNDLE),
                                         "--manifest", str(ct6_dataset), "--epochs", "1", "--tracking-uri", uri, *sets],
                                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert results[1].returncode == 0, results[1].stderr[-3000:]
    assert (tmp_path / "folds1" / "model.pt").is_file()  # no validation: the last weights
    assert results[5].returncode != 0
    assert ("1 validation case(s) for 2 processes: under torchrun each process validates a share of the cases and "
            "needs at least one") in results[5].stderr
    assert "start at most 1 processes (--nproc_per_node)" in results[5].stderr
    assert not (tmp_path / "folds5").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_nodes_started_with_other_settings_are_refused(tmp_path: Path, ct6_dataset: Path) -> None:
    """Two nodes (here two torchrun launchers on this machine, --nnodes 2) where the second was given
    another learning rate: every process stops with one line naming the setting, before training.
    Before, both trained to the end, stepping one model's averaged gradients with two rates, and
    MLflow recorded only node 0's. Paths may differ between nodes (each its own output folder)."""
    import socket

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for node, extra in ((0, {}), (1, {"learning_rate": 0.5})):
        sets = [a for k, v in {**FAST, "output_dir": str(tmp_path / f"node{node}"), **extra}.items()
                for a in ("--set", f"{k}={json.dumps(v)}")]
        procs.append(subprocess.Popen(
            [torchrun, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
             "--master_port", str(port), "-m", "pipeline", "train", str(BUNDLE), "--manifest", str(ct6_dataset),
             "--epochs", "1", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *sets],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode != 0, err[-2000:]
        assert ("segpipe train: error: process 1 of 2 was started with other settings than process 0 "
                "(learning_rate 0.005 -> 0.5)") in err, err[-2000:]
    assert not (tmp_path / "node0" / "checkpoints").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_a_torchrun_restart_resumes_from_the_last_checkpoint(tmp_path: Path, ct6_dataset: Path) -> None:
    """``torchrun --max-restarts 1``: rank 1 is killed (SIGKILL) once a checkpoint is on disk;
    torchrun stops rank 0 and starts both again, and they resume from the last checkpoint (as
    ``--resume``) into the same MLflow run, each epoch logged once. Before, the restarted workers
    started afresh and deleted the checkpoints: a cluster job lost everything it had trained."""
    import psutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out, uri, epochs = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}", 6
    sets = [a for k, v in {**FAST, "output_dir": str(out), "val_interval": 2}.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", "-m", "pipeline", "train",
                                 str(BUNDLE), "--manifest", str(ct6_dataset), "--epochs", str(epochs),
                                 "--tracking-uri", uri, *sets], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
        killed, deadline = None, time.monotonic() + 240
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            if (out / "checkpoints" / "checkpoint_2.pt").is_file():
                for child in psutil.Process(proc.pid).children():
                    try:
                        if child.environ().get("LOCAL_RANK") == "1":
                            child.kill()
                            killed = child.pid
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(0.05)
        try:
            proc.wait(timeout=240)
        finally:  # a hang (restarted workers waiting for a dead peer) must not outlive the test
            if proc.poll() is None:
                for p in [*psutil.Process(proc.pid).children(recursive=True), proc]:
                    p.kill()
    stderr = log.read_text()
    assert killed is not None, "the run ended before rank 1 could be killed: " + stderr[-3000:]
    assert proc.returncode == 0, stderr[-9000:]
    assert stderr.count("torchrun restart 1 (--max-restarts): resuming from the last checkpoint") == 2  # both ranks
    assert "resumed from" in stderr and "starting afresh" not in stderr

    last = torch.load(out / "checkpoints" / f"checkpoint_{epochs}.pt", weights_only=True)
    assert last["trainer"]["iteration"] == epochs  # one iteration an epoch: trained to the end
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("phantom_ct_3d").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the killed attempt's run, resumed and ended
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "train/loss_iteration")] == list(range(1, epochs + 1))
    assert [m.step for m in client.get_metric_history(run_id, "val/mean_dice")] == [2, 4, 6]
