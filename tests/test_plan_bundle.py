"""``segpipe plan``: a manifest -> a complete bundle (pipeline.plan_bundle), and what planned bundles
need at run time: one file per channel, the split normalisation of mixed channels surviving
``Invertd``, the slice-by-slice predictor, the contract check. Real files on disk with LPS
(non-identity) affines; the end-to-end trainings are in the slow tier."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.bundle import get, load_bundle
from pipeline.errors import InputError, UsageError
from pipeline.plan_bundle import plan_bundle
from pipeline.synthetic import write_dataset

AFFINE = np.array([[-1.0, 0, 0, 20.0], [0, -1.0, 0, 10.0], [0, 0, 2.0, -5.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def per_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """5 two-channel MR studies, one file per channel (32x32x10), and the bundle planned from them."""
    root = tmp_path_factory.mktemp("planned")
    manifest = write_dataset("mr2ch", 5, root / "data", seed=0, shape=(32, 32, 10), channel_layout="files")
    plan_bundle(manifest, root / "bundle", device="cpu", budget_min=1)
    return manifest, root / "bundle"


def test_the_planned_bundle_is_complete_and_states_every_decision(per_file: tuple[Path, Path]):
    manifest, bundle = per_file
    for f in ("configs/metadata.json", "configs/common.json", "configs/train.json", "configs/inference.json",
              "configs/evaluate.json", "configs/logging.conf", "docs/README.md", "LICENSE", "plan.json",
              "fingerprint.json", "splits.json"):
        assert (bundle / f).is_file(), f
    plan = json.loads((bundle / "plan.json").read_text())
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["fingerprint_sha256"] == plan["fingerprint_sha256"] == hashlib.sha256(
        (bundle / "fingerprint.json").read_bytes()).hexdigest()
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["channel_def"] == {"0": "T1", "1": "T2"}
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "liver", "2": "kidney", "3": "spleen"}
    readme = (bundle / "docs/README.md").read_text()
    assert all(why in readme for why in plan["rationale"].values())  # every decision, with its figure
    from pipeline.plan_docs import UNTRAINED, status_block

    assert status_block(UNTRAINED) in readme  # the weights status an export rewrites
    every = load_bundle(bundle, ("common.json", "train.json", "inference.json"))
    table = [line for line in readme.splitlines() if line.startswith("| ") and line.count("|") >= 4]
    named = {i for line in table for i in re.findall(r"`([A-Za-z_]+)`", line.split("|")[2])}
    assert "roi_size" in named and "slice_axis" not in named  # a 3D plan has no slice axis
    assert not [i for i in named if i not in every], "the docs name ids the bundle lacks"
    commands = readme.split("## Commands", 1)[1]  # MONAI's runner is run from inside the bundle
    assert commands.index(f"cd {bundle.name}\n") < commands.index("python -m monai.bundle run")
    common = json.loads((bundle / "configs/common.json").read_text())
    assert common["dataset_dir"] == "$@bundle_root + '/../data'" and common["in_channels"] == 2
    parser = load_bundle(bundle, ("common.json", "train.json"))
    assert Path(parser.get_parsed_content("manifest")).resolve() == manifest.resolve()
    val = json.loads((bundle / "splits.json").read_text())["folds"][0]["val"]  # patient-grouped: 2 studies
    assert sorted(d["id"] for d in parser.get_parsed_content("validate#datalist")) == val == ["mr2ch_000", "mr2ch_001"]
    net = get(parser, "network_def").eval()
    assert tuple(net(torch.zeros(1, 2, *plan["patch"]["roi_size"])).shape) == (1, 4, *plan["patch"]["roi_size"])
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    tiles = get(load_bundle(bundle, ("common.json", "inference.json"), {"tiling": "overlap-tile", "tile_margin": 4}),
                "inferer")  # the predictor's ids are declared, as in the shipped bundles
    assert tiles.kwargs["tiling"] == "overlap-tile" and tiles.kwargs["tile_margin"] == 4


def _dataset(root: Path, n: int = 5, values: tuple[int, ...] = (0, 1, 2), labels: dict | None = None,
             shapes: list[tuple[int, ...]] | None = None, zooms: list[float] | None = None) -> Path:
    """``n`` single-channel cases (16x16x8 unless ``shapes``) with blobs of label ``values``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for i in range(n):
        shape = (shapes or [(16, 16, 8)] * n)[i]
        affine = AFFINE.copy()
        affine[2, 2] = (zooms or [2.0] * n)[i]
        label = np.zeros(shape, np.uint8)
        for k, v in enumerate(v for v in values if v):
            label[2 + 5 * k: 6 + 5 * k, 3:9, ...] = v
        image = label.astype(np.float32) * 50 + np.random.default_rng(i).normal(0, 5, shape).astype(np.float32)
        for folder, data in (("imagesTr", image), ("labelsTr", label)):
            nib.save(nib.Nifti1Image(data, affine if data.ndim == 3 else np.diag([1.0, 1.0, 1.0, 1.0])),
                     root / folder / f"c{i}.nii.gz")
        entries.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    labels = labels or {"0": "background", "1": "a", "2": "b"}
    doc = {"name": "t", "tensorImageSize": "3D", "modality": {"0": "MR"}, "labels": labels, "training": entries}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


BAD = {  # kind -> (dataset arguments, the error's text)
    "labels_not_from_0": ({"values": (0, 1, 3), "labels": {"0": "bg", "1": "a", "3": "c"}},
                          "labels: values [0, 1, 3] must be consecutive from 0"),
    "undeclared_value": ({"values": (0, 1, 2), "labels": {"0": "bg", "1": "a"}},
                         "label values [2] not declared in the manifest's labels"),
    "2d_mixed_with_3d": ({"shapes": [(16, 16, 8)] * 4 + [(16, 16)]}, "2D image (16, 16) where 3D is expected"),
    "fewer_cases_than_folds": ({"n": 4}, "training: 4 cases, fewer than the 5 cross-validation folds"),
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path: Path, kind: str):
    kwargs, text = BAD[kind]
    manifest = _dataset(tmp_path / "data", **kwargs)
    with pytest.raises(InputError) as e:  # into folders that do not exist yet
        plan_bundle(manifest, tmp_path / "new" / "deeper" / "bundle", device="cpu", budget_min=1)
    assert text in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no bundle, no temp folder, no new folders
    if kind == "labels_not_from_0":  # named with its manifest, before any image is read
        assert str(e.value).startswith(f"{manifest}: labels: values [0, 1, 3]")


def test_channel_counts_differing_between_cases_are_named(tmp_path: Path):
    manifest = write_dataset("mr2ch", 5, tmp_path / "data", seed=0, shape=(24, 24, 6), channel_layout="files")
    doc = json.loads(manifest.read_text())
    doc["training"][3]["image"] = doc["training"][3]["image"][:1]
    manifest.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"training\[3\] mr2ch_003: image .*mr2ch_003_0000.nii.gz: 1 file\(s\)"):
        plan_bundle(manifest, tmp_path / "bundle", device="cpu", budget_min=1)
    assert not (tmp_path / "bundle").exists()


def test_warnings_small_volumes_absent_class_and_tenfold_spacing(tmp_path: Path):
    manifest = _dataset(tmp_path / "data", values=(0, 1), labels={"0": "bg", "1": "a", "2": "never"},
                        zooms=[2.0, 2.0, 2.0, 2.0, 25.0], shapes=[(16, 16, 8)] * 4 + [(12, 16, 2)])
    plan = plan_bundle(manifest, tmp_path / "bundle", device="cpu", budget_min=1)
    w = " | ".join(plan["warnings"])
    assert "'never' (label 2) is absent from every label image" in w
    assert "axis 2 differs 12-fold" in w and "planned for the median" in w
    assert "1 of 5 cases are smaller than the patch" in w and "c4.nii.gz" in w  # 12 voxels across
    assert plan["spacing"]["pixdim"][2] == 2.0
    assert all(line in (tmp_path / "bundle/docs/README.md").read_text() for line in plan["warnings"])


def test_the_planned_metadata_codes_the_labels_for_dicom_seg(per_file: tuple[Path, Path]):
    """liver, kidney, spleen: SNOMED CT Anatomical Structure and the organ's own code, so a DICOM
    SEG of the planned bundle does not call every segment "Tissue"."""
    _, bundle = per_file
    segments = json.loads((bundle / "configs/metadata.json").read_text())["dicom_seg"]["segments"]
    assert {n: (s["category"][0], s["type"]) for n, s in segments.items()} == {
        "liver": ("91723000", ["10200004", "SCT", "Liver"]), "kidney": ("91723000", ["64033007", "SCT", "Kidney"]),
        "spleen": ("91723000", ["78961009", "SCT", "Spleen"])}
    assert not [w for w in json.loads((bundle / "plan.json").read_text())["warnings"] if "SNOMED" in w]


def test_labels_without_a_code_are_left_to_the_generic_code_with_a_warning(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture):
    manifest = _dataset(tmp_path / "data", values=(0, 1, 2, 3),
                        labels={"0": "background", "1": "Parotid_L", "2": "blob", "3": "kidney right"})
    with caplog.at_level("WARNING", logger="pipeline.plan_bundle"):
        plan = plan_bundle(manifest, tmp_path / "bundle", device="cpu", budget_min=1)
    segments = json.loads((tmp_path / "bundle/configs/metadata.json").read_text())["dicom_seg"]["segments"]
    assert segments == {
        "Parotid_L": {"category": ["91723000", "SCT", "Anatomical Structure"],
                      "type": ["45289007", "SCT", "Parotid gland"], "modifier": ["7771000", "SCT", "Left"]},
        "kidney right": {"category": ["91723000", "SCT", "Anatomical Structure"],
                         "type": ["64033007", "SCT", "Kidney"], "modifier": ["24028007", "SCT", "Right"]}}
    [warning] = [w for w in plan["warnings"] if "SNOMED" in w]
    assert "'blob'" in warning and "Parotid" not in warning and "85756007" in warning
    assert warning in caplog.text and warning in (tmp_path / "bundle/docs/README.md").read_text()
    assert warning in json.loads((tmp_path / "bundle/plan.json").read_text())["warnings"]


def test_cli_plan_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture):
    from pipeline.cli import main

    manifest = _dataset(tmp_path / "data")
    assert main(["plan", str(manifest), "--out", str(tmp_path / "b"), "--budget-min", "1", "--device", "cpu"]) == 0
    assert "wrote bundle t_mr_3d" in capsys.readouterr().out
    assert main(["plan", str(manifest), "--out", str(tmp_path / "b")]) == 2  # never overwritten
    assert "exists and is not empty" in capsys.readouterr().err
    bad = _dataset(tmp_path / "bad", n=4)
    assert main(["plan", str(bad), "--out", str(tmp_path / "c")]) == 1
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("segpipe plan: error")]
    assert "fewer than the 5" in line and not (tmp_path / "c").exists()


def test_mixed_channel_normalisation_survives_invertd(tmp_path: Path, ct_dataset: Path):
    """CT and MR channels of one 4D image are normalised one scheme each (SplitDimd -> per-channel
    transform -> ConcatItemsd); the prediction still goes back to the source grid exactly as with
    one scheme for the image: the split keys carry the image's applied operations."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    from pipeline import plan as P
    from pipeline.postprocess import InvertToLabelsd

    case = ct_dataset.parent / "imagesTr" / "ct_000.nii.gz"
    src = nib.load(case)
    ct = np.asarray(src.dataobj, np.float32)
    nib.save(nib.Nifti1Image(np.stack([ct, ct * 0.01 + 3], -1), src.affine), tmp_path / "two.nii.gz")
    label = np.asarray(nib.load(ct_dataset.parent / "labelsTr" / "ct_000.nii.gz").dataobj)
    channels = [{"index": 0, "name": "CT", "modality": "CT"}, {"index": 1, "name": "MR", "modality": "other"}]
    stats = [{"percentile_00_5": -100.0, "percentile_99_5": 200.0, "mean": 50.0, "std": 40.0}, {}]
    split = P.normalisation(channels, stats)[0]["transforms"]
    assert [t["_target_"] for t in split] == ["SplitDimd", "ScaleIntensityRanged", "NormalizeIntensityd",
                                              "ConcatItemsd", "DeleteItemsd"]
    import monai.transforms as mt

    def chain(norm: list[dict]) -> Compose:
        return Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", "RAS"),
                        Spacingd("image", pixdim=[1.1, 1.3, 2.0]),
                        *[getattr(mt, t["_target_"])(**{k: v for k, v in t.items() if k != "_target_"})
                          for t in norm]])

    masks = []
    for norm in (split, [{"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True}]):
        pre = chain(norm)
        data = pre({"image": str(tmp_path / "two.nii.gz")})
        assert data["image"].shape[0] == 2 and set(data) == {"image"}
        lab = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", "RAS"),
                       Spacingd("image", pixdim=[1.1, 1.3, 2.0], mode="nearest")])(
            {"image": str(ct_dataset.parent / "labelsTr" / "ct_000.nii.gz")})["image"]
        onehot = torch.cat([(lab == k).float() for k in range(4)])
        out = InvertToLabelsd("pred", transform=pre, softmax=False)({"image": data["image"], "pred": onehot})
        masks.append(np.asarray(out["pred"][0]))
    assert masks[0].shape == label.shape
    np.testing.assert_array_equal(masks[0], masks[1])  # split or not, the same inversion
    assert (masks[0] == label).mean() > 0.97


def test_lateral_labels_flip_left_right_with_the_pair_swapped_in_training_and_tta(tmp_path: Path, per_file):
    """left_parotid/right_parotid: the bundle flips along the left-right axis with RandLateralFlipd
    swapping the pair, its inferer swaps them back in flip TTA, and the docs say so; a bundle without
    lateral labels keeps MONAI's plain flips and an inferer with nothing to swap."""
    from monai.transforms import RandFlipd

    from pipeline.transforms import RandLateralFlipd

    labels = {"0": "background", "1": "left_parotid", "2": "right_parotid"}
    manifest = _dataset(tmp_path / "data", labels=labels)
    plan = plan_bundle(manifest, tmp_path / "bundle", device="cpu", budget_min=1)
    assert plan["augmentation"]["flip_axes"] == [0, 1, 2] and plan["augmentation"]["lateral_pairs"] == [[1, 2]]
    parser = load_bundle(tmp_path / "bundle", ("common.json", "train.json"))
    flips = parser.get_parsed_content("train#flip_transforms")
    assert [type(t) for t in flips] == [RandLateralFlipd, RandFlipd, RandFlipd] and flips[0].pairs == [(1, 2)]
    inferer = get(parser, "inferer")
    assert inferer.kwargs["lateral_pairs"] == [[1, 2]] and inferer.kwargs["lateral_axis"] == 0
    assert inferer.kwargs["tta"] and inferer.kwargs["tta_axes"] == [0, 1, 2]
    case = parser.get_parsed_content("train#datalist")[0]
    for sample in parser.get_parsed_content("train#preprocessing")(case):  # the whole chain runs
        assert set(sample["label"].unique().tolist()) <= {0.0, 1.0, 2.0}
        assert sample["weight"].shape == sample["label"].shape
    parser["flip_axes"] = [1, 2]  # --set flip_axes=[1,2]: no left-right flip, for a measurement without it
    assert {type(t) for t in parser.get_parsed_content("train#flip_transforms", lazy=False)} == {RandFlipd}
    readme = (tmp_path / "bundle/docs/README.md").read_text()
    assert "Lateral label pairs (`lateral_pairs`): left_parotid/right_parotid (1/2); a flip along axis 0" in readme
    assert plan["rationale"]["augmentation"] in readme and "`lateral_pairs`" in readme
    plain = load_bundle(per_file[1], ("common.json", "train.json"))
    assert {type(t) for t in plain.get_parsed_content("train#flip_transforms")} == {RandFlipd}
    assert get(plain, "inferer").kwargs["lateral_pairs"] == []


def test_a_bad_lateral_pairs_declaration_is_refused_before_fingerprinting(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    def no_fingerprint(*args, **kwargs):
        raise AssertionError("fingerprinted a manifest with a bad lateral_pairs field")

    monkeypatch.setattr("pipeline.fingerprint.write_fingerprint", no_fingerprint)
    manifest = _dataset(tmp_path / "data", labels={"0": "background", "1": "left_parotid", "2": "right_parotid"})
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "lateral_pairs": [["left_parotid", "right_parotd"]]}))
    with pytest.raises(InputError, match=f"^{manifest}: lateral_pairs\\[0\\]: unknown label 'right_parotd'"):
        plan_bundle(manifest, tmp_path / "bundle", device="cpu", budget_min=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written


def test_slice_inferer_is_the_overlap_tile_predictor_on_each_slice():
    from pipeline.inference import predict_tiles
    from pipeline.slice_inference import SliceTileInferer

    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 3, 3, padding=1)
    volume = torch.randn(1, 2, 14, 3, 10)
    kw = {"roi_size": (8, 8), "overlap": 0.5, "margin": "auto", "tta": True, "tta_axes": [1]}
    with torch.no_grad():
        got = SliceTileInferer(slice_axis=1, chunk=2, **kw)(volume, net)
        want = torch.stack([predict_tiles(net, volume[:, :, :, k], **kw) for k in range(3)], dim=3)
    assert got.shape == (1, 3, 14, 3, 10)
    torch.testing.assert_close(got, want)


def test_predict_groups_channel_files_and_refuses_a_manifest_of_other_labels(per_file, tmp_path, cells_dataset):
    from pipeline.predict import predict

    manifest, planned = per_file
    bundle = shutil.copytree(planned, tmp_path / "bundle")
    torch.save(get(load_bundle(bundle, ("common.json",)), "network_def").state_dict(), bundle / "models/model.pt")
    folder = tmp_path / "incoming"
    folder.mkdir()
    for name in ("mr2ch_000_0000.nii.gz", "mr2ch_000_0001.nii.gz", "mr2ch_001_0000.nii.gz"):
        shutil.copy(manifest.parent / "imagesTr" / name, folder / name)
    rows = predict(bundle, folder, tmp_path / "masks", device="cpu", progress=False, overrides={"tta": False})
    rows = sorted(rows, key=lambda r: r["study_id"])
    assert [(r["study_id"], r["status"]) for r in rows] == [("mr2ch_000", "ok"), ("mr2ch_001", "failed")]
    assert "case 'mr2ch_001' has channel files mr2ch_001_0000.nii.gz" in rows[1]["error"]
    mask, label = (nib.load(tmp_path / "masks/mr2ch_000.nii.gz"),
                   nib.load(manifest.parent / "labelsTr/mr2ch_000.nii.gz"))
    assert mask.shape == label.shape and np.allclose(mask.affine, label.affine)
    with pytest.raises(InputError, match=r"labels \['background', 'cell'\] \(2\) do not match bundle bundle"):
        predict(bundle, cells_dataset, tmp_path / "other", device="cpu", progress=False)
    with pytest.raises(UsageError, match="exists and is not empty"):
        plan_bundle(manifest, bundle)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mr2ch-files", "mr2ch-4d", "ct3d-slices"])
def test_planned_bundle_trains_and_predicts(tmp_path: Path, mlflow_store: str, kind: str):
    """validate -> plan -> train (a few iterations) -> predict the held-out fold, with no edit:
    one file per channel, 4D images and a 2D network on thin 3D volumes."""
    from pipeline.predict import predict
    from pipeline.train import train_bundle

    data, layout = kind.split("-")
    shape = (40, 40, 5) if layout == "slices" else (32, 32, 10)
    extra = {"channel_layout": layout} if data == "mr2ch" else {}
    manifest = write_dataset(data, 5, tmp_path / "data", seed=0, shape=shape, **extra)
    plan = plan_bundle(manifest, tmp_path / "bundle", device="cpu", budget_min=1)
    assert plan["spatial_dims"] == (2 if layout == "slices" else 3)
    summary = train_bundle(tmp_path / "bundle", device="cpu", tracking_uri=mlflow_store, epochs=1,
                           overrides={"epoch_length": 4})
    assert summary["exported"] and set(summary["val_dice"]) == {"liver", "kidney", "spleen"}
    docs = (tmp_path / "bundle" / "docs" / "README.md").read_text()
    assert "no weights yet" not in docs and "**Status: trained.**" in docs and "`segpipe predict` uses it" in docs
    assert "`models/model.pt` is `runs/model.pt` from `segpipe train`" in docs  # relative: true when the bundle moves
    assert f"validation mean Dice {summary['best_val_mean_dice']:.4f} at epoch 1" in docs
    rows = predict(tmp_path / "bundle", manifest, tmp_path / "masks", device="cpu", progress=False)
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 5


def test_train_refuses_a_dataset_of_other_labels_in_one_line_before_training(tmp_path: Path, ct_dataset: Path):
    """The hippocampus bundle given a dataset with other labels stops after validation, in one line."""
    from pipeline.cli import main
    from pipeline.train import train_bundle

    bundle = tmp_path / "hippocampus"
    shutil.copytree(Path(__file__).resolve().parents[1] / "bundles/hippocampus_mri_3d/configs", bundle / "configs")
    with pytest.raises(InputError) as e:
        train_bundle(bundle, manifest=ct_dataset, epochs=1, device="cpu")
    assert "\n" not in str(e.value) and "anterior" in str(e.value) and "liver" in str(e.value)
    assert main(["train", str(bundle), "--manifest", str(ct_dataset), "--epochs", "1", "--device", "cpu"]) == 1
    assert not (bundle / "runs").exists()


def test_a_2d_plan_for_cuda_runs_its_intensity_augmentation(tmp_path: Path):
    """Planned for a GPU, a 2D bundle gets nnU-Net's intensity augmentation; its low-resolution
    simulation must upsample bilinearly (MONAI's default, trilinear, needs 5D input and crashed the
    first training sample it hit)."""
    from pipeline.manifest import datalist

    cells = write_dataset("cells2d", 5, tmp_path / "cells", seed=0, shape=(64, 64))
    plan = plan_bundle(cells, tmp_path / "bundle", device="cuda", budget_min=1)
    assert plan["spatial_dims"] == 2 and plan["augmentation"]["lowres_prob"] > 0
    every = {k: 1.0 for k in ("lowres_prob", "blur_prob", "contrast_prob", "gamma_prob", "noise_prob", "intensity_prob")}
    parser = load_bundle(tmp_path / "bundle", ("common.json", "train.json"), {**every, "device": "$torch.device('cpu')"})
    transform = get(parser, "train#preprocessing")
    out = transform(datalist(cells, "all")[0])
    sample = out[0] if isinstance(out, list) else out
    assert sample["image"].ndim == 3 and torch.isfinite(sample["image"]).all()


def test_a_dataset_folder_with_a_quote_in_its_name_plans_a_bundle_that_loads(tmp_path: Path):
    """The dataset's relative path goes into a $-expression: o'brien used to end its string early."""
    manifest = write_dataset("ct3d", 5, tmp_path / "o'brien", seed=0, shape=(24, 24, 8))
    plan_bundle(manifest, tmp_path / "bundle", device="cpu", budget_min=1)
    parser = load_bundle(tmp_path / "bundle", ("common.json", "train.json"))
    assert Path(parser.get_parsed_content("manifest")).resolve() == manifest.resolve()


def test_a_case_far_smaller_than_the_patch_is_padded_not_a_crash(tmp_path: Path):
    """Mirror padding by torch's "reflect" needs the pad smaller than the image: a case under about a
    third of the patch crashed training. numpy's "symmetric" mirrors any size."""
    from pipeline.manifest import datalist

    manifest = _dataset(tmp_path / "data", shapes=[(48, 48, 24)] * 4 + [(8, 8, 4)])
    plan_bundle(manifest, tmp_path / "bundle", device="cpu", budget_min=1)
    parser = load_bundle(tmp_path / "bundle", ("common.json", "train.json"))
    tiny = next(e for e in datalist(manifest, "all") if e["image"].endswith("c4.nii.gz"))
    out = get(parser, "train#preprocessing")(tiny)
    sample = out[0] if isinstance(out, list) else out
    assert list(sample["image"].shape[1:]) == list(parser.get_parsed_content("crop_size"))


def test_plan_into_the_current_empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """--out . (an empty current folder) is filled in place; it failed after all the work, on
    rmdir('.')."""
    manifest = _dataset(tmp_path / "data")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    plan_bundle(manifest, Path("."), device="cpu", budget_min=1)
    assert (tmp_path / "here" / "configs" / "common.json").is_file() and not list(tmp_path.glob(".*plan-*"))
    parser = load_bundle(tmp_path / "here", ("common.json",))
    assert Path(parser.get_parsed_content("manifest")).resolve() == manifest.resolve()


def _single_slice(root: Path, layout: str) -> Path:
    """5 cell images (32x32, LPS affine) stored as single-slice volumes: "xy1" (X, Y, 1) or "xy1c"
    (X, Y, 1, 2), labels (X, Y, 1)."""
    manifest = write_dataset("cells2d", 5, root, seed=0, shape=(32, 32))
    doc = json.loads(manifest.read_text())
    for e in doc["training"]:
        e.pop("instance")
        for key in ("image", "label"):
            img = nib.load(root / e[key])
            a = np.asarray(img.dataobj)[:, :, None]
            a = np.stack([a, a * 0.5 + 3], -1) if key == "image" and layout == "xy1c" else a
            nib.save(nib.Nifti1Image(a, img.affine), root / e[key])
    channels = {"0": "microscopy", "1": "phase"} if layout == "xy1c" else {"0": "microscopy"}
    manifest.write_text(json.dumps({**doc, "tensorImageSize": "3D", "modality": channels}))
    return manifest


@pytest.mark.parametrize("layout", ["xy1", "xy1c"])
def test_2d_images_stored_as_single_slice_volumes_plan_2d_slices_and_predict_in_their_geometry(tmp_path, layout):
    """(X, Y, 1) and (X, Y, 1, C) load as volumes one voxel thick: planned as 2D slices across that
    axis, as (1, X, Y) is (a plain 2D plan crashed on Orientationd: 2 axcodes for 3 axes)."""
    from pipeline.manifest import datalist
    from pipeline.predict import predict

    manifest = _single_slice(tmp_path / "data", layout)
    plan = plan_bundle(manifest, tmp_path / "bundle", device="cpu", budget_min=1)
    assert (plan["spatial_dims"], plan["slice_axis"], plan["spacing"]["pixdim"]) == (2, 2, [0.5, 0.5, 0.0])
    parser = load_bundle(tmp_path / "bundle", ("common.json", "train.json"))
    out = get(parser, "train#preprocessing")(datalist(manifest, "all")[0])
    sample = out[0] if isinstance(out, list) else out
    assert tuple(sample["image"].shape) == (len(plan["channels"]), *plan["patch"]["roi_size"])
    torch.save(get(parser, "network_def").state_dict(), tmp_path / "bundle/models/model.pt")
    rows = predict(tmp_path / "bundle", manifest, tmp_path / "masks", device="cpu", progress=False)
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 5
    mask, label = nib.load(tmp_path / "masks/cells_003.nii.gz"), nib.load(manifest.parent / "labelsTr/cells_003.nii.gz")
    assert mask.shape == label.shape == (32, 32, 1) and np.allclose(mask.affine, label.affine)


@pytest.mark.slow
def test_a_bundle_planned_from_single_slice_volumes_trains(tmp_path: Path, mlflow_store: str):
    from pipeline.train import train_bundle

    manifest = _single_slice(tmp_path / "data", "xy1")
    plan_bundle(manifest, tmp_path / "bundle", device="cpu", budget_min=1)
    summary = train_bundle(tmp_path / "bundle", device="cpu", tracking_uri=mlflow_store, epochs=1,
                           overrides={"epoch_length": 2})
    assert summary["exported"] and set(summary["val_dice"]) == {"cell"}


def test_out_through_a_symlinked_folder_points_at_the_data(tmp_path: Path):
    """The system follows a symlink before "..": a path to the data computed from the unresolved
    --out (bundle/../../data) led from the link's target to another folder."""
    manifest = _dataset(tmp_path / "data")
    (tmp_path / "real/a/b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real/a/b")
    plan_bundle(manifest, tmp_path / "link/bundle", device="cpu", budget_min=1)
    parser = load_bundle(tmp_path / "link/bundle", ("common.json",))
    assert Path(parser.get_parsed_content("manifest")).resolve() == manifest.resolve()
    assert json.loads((tmp_path / "real/a/b/bundle/configs/common.json").read_text())["dataset_dir"] == \
        "$@bundle_root + '/../../../../data'"


def test_a_killed_plans_temp_folder_is_removed_by_the_next_plan_but_a_live_ones_is_kept(tmp_path: Path):
    import subprocess

    from pipeline.fileio import HOST

    manifest = _dataset(tmp_path / "data")
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        names = {"dead": f".bundle.plan-{dead.pid}.{HOST}", "dead_old": f".other.plan-{dead.pid}",
                 "live": f".bundle.plan-{live.pid}.{HOST}", "elsewhere": f".bundle.plan-{dead.pid}.0badc0de"}
        for name in names.values():
            (tmp_path / name / "configs").mkdir(parents=True)
        plan_bundle(manifest, tmp_path / "bundle", device="cpu", budget_min=1)
    finally:
        live.kill()
        live.wait()
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"data", "bundle", names["live"], names["elsewhere"]}
