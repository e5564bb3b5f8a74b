"""The bundles in bundles/: metadata contract, shared configs, and real runs through MONAI's own
``python -m monai.bundle run`` / ``verify_net_in_out`` and through ``segpipe train/predict``.

Runs use tiny synthetic data and shapes (one epoch, small ROIs); the ones that need the real
hippocampus data skip when ../shared/data is absent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.bundle import get, load_bundle
from pipeline.synthetic import write_dataset

ROOT = Path(__file__).resolve().parent.parent
BUNDLES = ROOT / "bundles"
NAMES = ["cells_2d", "hippocampus_mri_3d", "phantom_ct_3d"]
WORKFLOW_CONFIGS = ["train.json", "inference.json", "evaluate.json"]
HIPPO_EXAMPLE = ROOT / "data_manifests" / "hippocampus_example.json"
HIPPO_DATA = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"
# ids that exist once per config by MONAI's design: each config's own entry points
ENTRY_IDS = {"run", "initialize", "finalize", "imports", "+imports"}
# phantom_ct_3d's common/train/inference are owned elsewhere; these ids are still duplicated there


# bundles written by `segpipe plan` from synthetic data (planned once per session): the static checks
# hold for them too. mr2ch_files: 3D, two channels, one file per channel; ct_slices: a 2D network on
# thin 3D volumes (slice by slice)
PLANNED = {"planned_mr2ch_files": ("mr2ch", (32, 32, 10), {"channel_layout": "files"}),
           "planned_ct_slices": ("ct3d", (40, 40, 5), {})}
STATIC = [*NAMES, "headneck_ct_oar", *PLANNED]  # headneck_ct_oar: planned, shipped, no weights yet


@pytest.fixture(scope="session")
def planned_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pipeline.plan_bundle import plan_bundle

    root, out = tmp_path_factory.mktemp("planned"), {}
    for name, (kind, shape, extra) in PLANNED.items():
        manifest = write_dataset(kind, 5, root / f"{name}_data", seed=0, shape=shape, **extra)
        plan_bundle(manifest, root / name, device="cpu", budget_min=1)
        out[name] = root / name
    return out


def _folder(name: str, request: pytest.FixtureRequest) -> Path:
    """A shipped bundle's folder, or a planned one's."""
    return request.getfixturevalue("planned_bundles")[name] if name in PLANNED else BUNDLES / name


def _configs(folder: Path) -> dict[str, dict]:
    folder = folder / "configs"
    return {f: json.loads((folder / f).read_text()) for f in ["common.json", *WORKFLOW_CONFIGS, "metadata.json"]}


def _bundle_run(bundle: Path, configs: list[str], **overrides: object) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` from the bundle folder, as its README says; overrides as
    ``--id value`` (JSON-encoded where not a plain string)."""
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", "."]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _bundle_run_here(bundle: Path, configs: list[str], **overrides: object) -> None:
    """The same ``monai.bundle.run`` in this process (no interpreter start-up); logging_file=False
    so the bundle's logging.conf does not reconfigure the test session's loggers."""
    from monai.bundle import run

    run(config_file=[str(bundle / "configs" / c) for c in configs], bundle_root=str(bundle), logging_file=False,
        **overrides)


def _random_weights(bundle: Path, path: Path) -> Path:
    net = get(load_bundle(bundle, ("common.json",)), "network_def")
    torch.save(net.state_dict(), path)
    return path


# -- static checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STATIC)
def test_metadata_contract(name, request):
    folder = _folder(name, request)
    cfg = _configs(folder)
    meta = cfg["metadata.json"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert meta["version"] in meta["changelog"]
    common = cfg["common.json"]
    fmt = meta["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert image["num_channels"] == common["in_channels"]
    assert len(image["spatial_shape"]) == common["spatial_dims"]
    assert pred["num_channels"] == common["out_channels"] == len(common["label_names"])
    assert list(pred["channel_def"].values()) == common["label_names"]
    for f in ("configs/logging.conf", "docs/README.md", "LICENSE"):
        assert (folder / f).is_file(), f"{name}: no {f}"
    assert "Apache License" in (folder / "LICENSE").read_text()


@pytest.mark.parametrize("name", STATIC)
def test_dicom_seg_codes_are_snomed_ct_codes_of_the_labels(name, request):
    """Every 3D bundle codes its labels' DICOM SEG segments (``dicom_seg`` in metadata.json, read by
    pipeline.dicom_seg): one entry per label but the background, each code (value, scheme, meaning)
    as in pydicom's SNOMED CT dictionary, no label left to the generic "Tissue". The 2D cells
    bundle writes no SEG."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    cfg = _configs(_folder(name, request))
    meta, labels = cfg["metadata.json"], cfg["common.json"]["label_names"]
    if name == "cells_2d":
        assert "dicom_seg" not in meta
        return
    segments = meta["dicom_seg"]["segments"]
    assert list(segments) == labels[1:]
    snomed = {(c.value, c.meaning) for c in (getattr(codes.SCT, k) for k in dir(codes.SCT)) if isinstance(c, Code)}
    for label, entry in segments.items():
        assert set(entry) <= {"category", "type", "modifier", "description"}, label
        for key in ("category", "type", "modifier"):
            if key in entry:
                value, scheme, meaning = entry[key]
                assert scheme == "SCT" and (value, meaning) in snomed, (label, key, entry[key])
        assert entry["type"][0] != "85756007", label


@pytest.mark.parametrize("name", STATIC)
def test_standard_ids(name, request):
    cfg = _configs(_folder(name, request))
    common, train, infer, evaluate = (cfg[f] for f in ["common.json", *WORKFLOW_CONFIGS])
    assert {"bundle_root", "dataset_dir", "manifest", "output_dir", "network_def", "preprocessing"} <= set(common)
    assert {"trainer", "handlers"} <= set(train["train"]) and {"evaluator", "handlers"} <= set(train["validate"])
    for c in (infer, evaluate):
        assert {"evaluator", "handlers", "run"} <= set(c)
    assert train["run"] == ["$@train#trainer.run()"]


def _blocks(obj, path: str = ""):
    """``(id path, block)`` for every nested block of a config: an object with at least three
    entries, or a list holding at least two objects (a transform chain, a handler list)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in items:
        here = f"{path}#{key}" if path else str(key)
        big = (isinstance(value, dict) and len(value) >= 3) or (
            isinstance(value, list) and sum(isinstance(v, dict) for v in value) >= 2)
        if big:
            yield here, value
        yield from _blocks(value, here)


def copied_blocks(configs: dict[str, dict]) -> list[str]:
    """Blocks with the same content in two configs (at any depth): each belongs in common.json,
    defined once and referenced. Top-level entry points (``ENTRY_IDS``) exist once per config."""
    seen: dict[str, str] = {}
    copied = []
    for name, content in configs.items():
        top = {k: v for k, v in content.items() if k not in ENTRY_IDS}
        for path, block in _blocks(top):
            key = json.dumps(block, sort_keys=True)
            where = f"{name}:{path}"
            if key in seen and seen[key].split(":")[0] != name:
                copied.append(f"{where} = {seen[key]}")
            seen.setdefault(key, where)
        for k in top:  # a top-level id of common.json redefined in a workflow config
            if name != "common.json" and k in configs.get("common.json", {}):
                copied.append(f"{name}:{k} redefines common.json:{k}")
    return copied


@pytest.mark.parametrize("name", STATIC)
def test_no_block_duplicated_between_configs(name, request):
    """A block (nested ones too) defined with the same content in two of common/train/inference/
    evaluate is a copy: it belongs in common.json once."""
    cfg = _configs(_folder(name, request))
    found = copied_blocks({f: cfg[f] for f in ["common.json", *WORKFLOW_CONFIGS]})
    assert not found, f"{name}: copied blocks: {'; '.join(found)}"


def test_copied_block_check_looks_inside_nested_blocks():
    handler = {"_target_": "CheckpointLoader", "load_path": "@model_path", "load_dict": {"model": "@network"}}
    configs = {"common.json": {"x": 1}, "train.json": {"validate": {"handlers": [handler, {"_target_": "A"}]}},
               "evaluate.json": {"handlers": ["@y", handler]}}
    assert copied_blocks(configs) == ["evaluate.json:handlers#1 = train.json:validate#handlers#0"]
    assert copied_blocks({"common.json": {"x": 1}, "train.json": {"x": 2}}) == ["train.json:x redefines common.json:x"]


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


# a value that is, or an expression that starts with, an absolute path literal
ABSOLUTE = re.compile(r"""^\$?\s*(['"]?)(/|~|[A-Za-z]:[\\/])""")
PATH_IDS = ["bundle_root", "dataset_dir", "manifest", "output_dir", "model_path", "prediction_dir", "eval_dir"]


@pytest.mark.parametrize("name", STATIC)
def test_no_absolute_paths(name, request):
    """No absolute path in any config, and every path id resolves under ``bundle_root`` (or under
    ``dataset_dir``/``output_dir`` that do), so overriding those ids moves everything."""
    folder = _folder(name, request)
    for f, content in _configs(folder).items():
        if f != "metadata.json":
            bad = [s for s in _strings(content) if ABSOLUTE.search(s)]
            assert not bad, f"{name}/{f}: absolute paths {bad}"
    for configs in (["common.json", c] for c in WORKFLOW_CONFIGS):
        parser = load_bundle(folder, configs)
        parser["bundle_root"] = "BUNDLE_ROOT"
        for key in PATH_IDS:
            if key in parser:
                assert str(parser.get_parsed_content(key)).startswith("BUNDLE_ROOT"), (name, configs, key)


def test_absolute_path_check_can_fail():
    for bad in ["/data/x.nii", "$'/work/shared' + '/data'", "C:\\data", "~/data"]:
        assert ABSOLUTE.search(bad), bad
    for good in ["$@bundle_root + '/models/model.pt'", "@dataset_dir", "./imagesTr/x.nii.gz"]:
        assert not ABSOLUTE.search(good), good


@pytest.mark.parametrize("name", STATIC)
def test_verify_net_in_out(name, request):
    from monai.bundle import verify_net_in_out

    folder = _folder(name, request) / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(folder / "metadata.json"),
                      config_file=str(folder / "common.json"), device="cpu")
    with pytest.raises(ValueError, match="channel"):  # it does check: a wrong contract fails
        verify_net_in_out(net_id="network_def", meta_file=str(folder / "metadata.json"),
                          config_file=str(folder / "common.json"), device="cpu",
                          **{"_meta_#network_data_format#outputs#pred#num_channels": 7})


# -- runs ---------------------------------------------------------------------------------------
def _mr_as_hippocampus(root: Path) -> Path:
    """Synthetic mr3d studies with labels 1, 2 (liver and kidney touch, like anterior and
    posterior) and 3 (spleen) set to background: a three-class MRI dataset."""
    manifest = write_dataset("mr3d", 4, root, seed=0, shape=(24, 24, 10))
    for f in (root / "labelsTr").glob("*.nii.gz"):
        img = nib.load(f)
        data = np.asarray(img.dataobj).copy()
        data[data == 3] = 0
        nib.save(nib.Nifti1Image(data, img.affine, img.header), f)
    return manifest


def _check_run_outputs(out: Path, n_pred: int) -> None:
    masks = [p for p in (out / "predictions").glob("*.nii.gz") if not p.name.endswith("_probs.nii.gz")]
    assert len(masks) == n_pred  # <id>.nii.gz, as segpipe predict names them
    summary = (out / "evaluate" / "mean_dice_summary.csv").read_text()
    assert summary.startswith("class,mean") and "class0" in summary


def test_cells_2d_monai_bundle_run(tmp_path):
    """train (1 epoch) with ``python -m monai.bundle run``, then inference and evaluate with its
    weights through ``monai.bundle.run`` (the CLI's function; all three as subprocesses for every
    bundle in the slow tests). Two epochs validated every three: the last epoch is validated all
    the same (pipeline.handlers.ValidationHandler; MONAI's validated none, and wrote no model.pt)."""
    data = write_dataset("cells2d", 4, tmp_path / "data", seed=0, shape=(48, 48))
    out = tmp_path / "out"
    common = {"dataset_dir": str(data.parent), "output_dir": str(out), "num_folds": 2}
    r = _bundle_run(BUNDLES / "cells_2d", ["common.json", "train.json"], max_epochs=2, val_interval=3,
                    num_workers=0, roi_size=[32, 32], **common)
    assert (r.stdout + r.stderr).count("Got new best metric of val_mean_dice") == 1
    assert (out / "model.pt").is_file()  # the best model, by validate#handlers' ModelSaver
    for configs in (["common.json", "inference.json"], ["common.json", "evaluate.json"]):
        _bundle_run_here(BUNDLES / "cells_2d", configs, model_path=str(out / "model.pt"), roi_size=[32, 32], **common)
    _check_run_outputs(out, 4)


def test_monai_bundle_run_keeps_the_time_budget(tmp_path, caplog):
    """``python -m monai.bundle run`` trains within the bundle's ``time_budget_min`` as ``segpipe
    train`` does (``pipeline.time_budget.TimeBudget`` in train#handlers): a budget spent in the first
    iteration ends the run after that epoch, validated, out of a max_epochs of 50 (before, MONAI's
    runner ignored the budget and trained every one of them)."""
    data = write_dataset("cells2d", 4, tmp_path / "data", seed=0, shape=(48, 48))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="pipeline.time_budget"):
        _bundle_run_here(BUNDLES / "cells_2d", ["common.json", "train.json"], dataset_dir=str(data.parent),
                         output_dir=str(out), num_folds=2, max_epochs=50, val_interval=10, time_budget_min=1e-5,
                         num_workers=0, roi_size=[32, 32])
    assert "time budget of 0.0 min reached in epoch 1: last epoch" in caplog.text
    assert (out / "model.pt").is_file()  # the last epoch, validated although 1 is not a multiple of 10


def test_bundle_inference_leaves_out_a_study_it_cannot_read(tmp_path):
    """``python -m monai.bundle run`` with inference.json over a folder holding one corrupt file:
    the other studies get their masks, the bad one is named in one log line, and the run exits 1
    (before, the first bad study stopped the run with a traceback and left the rest unsegmented)."""
    data = write_dataset("cells2d", 2, tmp_path / "data", seed=0, shape=(48, 48))
    inp = tmp_path / "in"
    shutil.copytree(data.parent / "imagesTr", inp)
    (inp / "a_broken.nii.gz").write_bytes(b"not gzip")  # sorted first: read before the good ones
    weights = _random_weights(BUNDLES / "cells_2d", tmp_path / "model.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           "['configs/common.json','configs/inference.json']", "--bundle_root", ".", "--input", str(inp),
           "--output_dir", str(tmp_path / "out"), "--model_path", str(weights), "--dataset_dir", str(data.parent)]
    r = subprocess.run(cmd, cwd=BUNDLES / "cells_2d", capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    log = r.stdout + r.stderr
    assert r.returncode == 1, log[-3000:]
    assert sorted(p.name for p in (tmp_path / "out" / "predictions").iterdir()) == ["cells_000.nii.gz",
                                                                                    "cells_001.nii.gz"]
    assert re.search(r"study a_broken left out: \S*a_broken\.nii\.gz: ImageFileError", log)
    assert "1 of 3 studies could not be read and have no mask" in log and "Traceback" not in log


@pytest.mark.skipif(not (HIPPO_DATA / "dataset.json").is_file(), reason="no ../shared/data/Task04_Hippocampus")
@pytest.mark.parametrize("compile", [pytest.param(True, marks=pytest.mark.slow), False], ids=["compiled", "eager"])
def test_hippocampus_one_epoch_on_real_cases(tmp_path, mlflow_store, compile):
    """The bundle as configured (z-score, 1 mm, ROI 40x56x40, nnU-Net's Dice term; torch.compile as
    shipped in the slow tier: compiling costs about 50 s) for one epoch on five real cases
    (data_manifests/hippocampus_example.json: 4 train, 1 validation), then segpipe predict."""
    from pipeline.predict import predict
    from pipeline.train import train_bundle

    bundle = BUNDLES / "hippocampus_mri_3d"
    summary = train_bundle(bundle, manifest=HIPPO_EXAMPLE, epochs=1, device="cpu", tracking_uri=mlflow_store,
                           overrides={"output_dir": str(tmp_path / "train"), "val_interval": 1, "num_workers": 0,
                                      "features": [8, 16, 32, 64], "compile": compile})
    assert summary["epochs"] == 1 and set(summary["val_dice"]) == {"anterior", "posterior"}
    from mlflow.tracking import MlflowClient  # the shipped recipe: compiled, nnU-Net's Dice term

    params = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"]).data.params
    assert (params["compile"], params["dice_include_background"], params["batch_dice"]) == (str(compile), "False", "True")
    case = HIPPO_DATA / "imagesTr" / "hippocampus_011.nii.gz"
    rows = predict(bundle, case, tmp_path / "masks", device="cpu", progress=False,
                   overrides={"model_path": summary["model_path"], "folds": [], "features": [8, 16, 32, 64]})
    assert [r["status"] for r in rows] == ["ok"]
    mask, src = nib.load(tmp_path / "masks" / "hippocampus_011.nii.gz"), nib.load(case)
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_monai_bundle_run_cli(tmp_path, name, ct_dataset, cells_dataset):
    """train (1 epoch), inference and evaluate, each as ``python -m monai.bundle run``, on tiny
    synthetic data (hippocampus: MR phantoms with three classes); inference and evaluate with
    random weights saved into a copy of the bundle's models/."""
    bundle = tmp_path / name
    shutil.copytree(BUNDLES / name, bundle, ignore=shutil.ignore_patterns("runs", "*.pt"))
    (bundle / "models").mkdir(exist_ok=True)
    _random_weights(bundle, bundle / "models" / "model.pt")
    out = tmp_path / "out"
    manifest = {"cells_2d": cells_dataset, "phantom_ct_3d": ct_dataset}.get(name) or _mr_as_hippocampus(tmp_path / "mr")
    roi = {"cells_2d": [32, 32], "hippocampus_mri_3d": [16, 16, 16], "phantom_ct_3d": [32, 32, 16]}[name]
    # folds []: the random models/model.pt, not a shipped fold ensemble (hippocampus_mri_3d's default)
    small = {"manifest": str(manifest), "output_dir": str(out), "roi_size": roi, "num_folds": 2, "folds": []}
    _bundle_run(bundle, ["common.json", "train.json"], max_epochs=1, val_interval=1, num_workers=0,
                tracking="mlflow", **small)
    _bundle_run(bundle, ["common.json", "inference.json"], prediction_dir=str(out / "predictions"), **small)
    _bundle_run(bundle, ["common.json", "evaluate.json"], tracking="mlflow", **small)
    _check_run_outputs(out, 4)
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "--net_id", "network_def",
           "--meta_file", "configs/metadata.json", "--config_file", "configs/common.json"]
    r = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "verified with no error" in r.stdout + r.stderr, r.stderr[-2000:]
    # --tracking mlflow found train#trainer, validate#evaluator and evaluator
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("monai_experiment").experiment_id])
    assert len(runs) == 2
    assert any("train_loss" in r.data.metrics and "val_mean_dice" in r.data.metrics for r in runs)
    assert any("mean_dice" in r.data.metrics for r in runs)


def test_cells_2d_segpipe_train_and_predict_with_shipped_weights(tmp_path, mlflow_store):
    """``segpipe train`` runs the bundle; ``segpipe predict`` works on a fresh clone with the
    shipped models/model.pt and segments held-out synthetic cells well."""
    from pipeline.cli import main

    data = write_dataset("cells2d", 3, tmp_path / "data", seed=1000, shape=(64, 64))
    assert main(["train", str(BUNDLES / "cells_2d"), "--manifest", str(data), "--epochs", "1", "--device", "cpu",
                 "--tracking-uri", mlflow_store, "--set", "num_folds=2",
                 "--set", f"output_dir={tmp_path / 'train'}", "--set", "val_interval=1", "--set", "num_workers=0",
                 "--set", "roi_size=[32, 32]"]) == 0
    assert (tmp_path / "train" / "model.pt").is_file()
    assert (BUNDLES / "cells_2d" / "models" / "model.pt").stat().st_size < 8 * 2**20
    assert main(["predict", str(BUNDLES / "cells_2d"), "--input", str(tmp_path / "data" / "imagesTr"),
                 "--output", str(tmp_path / "masks"), "--device", "cpu", "--no-progress"]) == 0
    dice = []
    for i in range(3):
        pred = np.asarray(nib.load(tmp_path / "masks" / f"cells_{i:03d}.nii.gz").dataobj) > 0
        ref = np.asarray(nib.load(tmp_path / "data" / "labelsTr" / f"cells_{i:03d}.nii.gz").dataobj) > 0
        dice.append(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))
    assert np.mean(dice) > 0.85, dice


# -- settings: every id the code reads is declared in every bundle ------------------------------
@pytest.mark.parametrize("name", STATIC)
def test_every_setting_the_code_reads_is_declared(name, request):
    """``TRAIN_IDS`` (segpipe train) and ``PREDICT_IDS`` (segpipe predict) are all declared, so
    any of them can be ``--set`` on any bundle (e.g. a time budget on every bundle)."""
    from pipeline.predict import PREDICT_IDS
    from pipeline.train import TRAIN_IDS

    folder = _folder(name, request)
    train = load_bundle(folder, ("common.json", "train.json"), {"time_budget_min": 1})
    assert [k for k in TRAIN_IDS if k not in train] == []
    assert train.get_parsed_content("time_budget_min") == 1
    # init_weights is loaded in the bundle's own initialize, so python -m monai.bundle run honours it too
    assert any("pipeline.train.init_weights(@network, @init_weights, @fold)" in x for x in train["initialize"])
    infer = load_bundle(folder, ("common.json", "inference.json"))
    assert [k for k in PREDICT_IDS if k not in infer] == []


def test_train_refuses_a_bundle_that_lacks_a_setting(tmp_path, ct_dataset):
    from pipeline.errors import UsageError
    from pipeline.train import train_bundle

    bundle = tmp_path / "b"
    shutil.copytree(BUNDLES / "phantom_ct_3d" / "configs", bundle / "configs")
    train = json.loads((bundle / "configs" / "train.json").read_text())
    del train["model_selection"]
    (bundle / "configs" / "train.json").write_text(json.dumps(train))
    with pytest.raises(UsageError, match="lack the id.*model_selection"):
        train_bundle(bundle, manifest=ct_dataset, epochs=1, overrides={"output_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()


# -- one post-processing path: segpipe predict and monai.bundle run write the same masks ---------
def test_segpipe_predict_and_monai_bundle_run_write_identical_masks(tmp_path, ct_dataset):
    """Same bundle (shipped weights), same studies: ``segpipe predict`` and ``python -m
    monai.bundle run`` with inference.json write the same files, voxel for voxel, with the same
    geometry (both routes run the bundle's own ``postprocessing``, in its own precision)."""
    from pipeline.predict import predict

    bundle, studies = BUNDLES / "phantom_ct_3d", ct_dataset.parent / "imagesTr"
    rows = predict(bundle, studies, tmp_path / "segpipe", device="cpu", progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 4
    _bundle_run_here(bundle, ["common.json", "inference.json"], input=str(studies),
                     prediction_dir=str(tmp_path / "bundle"))
    ours = sorted(p.name for p in (tmp_path / "segpipe").glob("*.nii.gz"))
    assert ours == sorted(p.name for p in (tmp_path / "bundle").glob("*.nii.gz")) == [f"{r['study_id']}.nii.gz" for r in rows]
    for name in ours:
        a, b = nib.load(tmp_path / "segpipe" / name), nib.load(tmp_path / "bundle" / name)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        assert a.get_data_dtype() == b.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(a.affine, b.affine)
        assert (int(a.header["qform_code"]), int(a.header["sform_code"])) == (int(b.header["qform_code"]),
                                                                               int(b.header["sform_code"]))
        assert np.asarray(a.dataobj).any()  # the shipped model finds organs: not two empty masks
    inside = tmp_path / "in"  # prediction_dir inside the input: a rerun must not take the masks for studies
    shutil.copytree(studies, inside)
    for _ in range(2):
        _bundle_run_here(bundle, ["common.json", "inference.json"], input=str(inside),
                         prediction_dir=str(inside / "masks"))
    assert sorted(p.relative_to(inside / "masks").as_posix() for p in (inside / "masks").rglob("*.nii.gz")) == ours
