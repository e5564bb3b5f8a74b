"""Manifests: MSD layout loads unchanged, paths stay inside the manifest's folder, splits, datalists."""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.errors import InputError, UsageError
from pipeline.manifest import datalist, load_manifest
from pipeline.splits import split_file, write_splits
from pipeline.validation import validate_manifest as validate

TASK04 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Task04_Hippocampus" / "dataset.json"


def write_manifest(root: Path, training: list, **extra) -> Path:
    """dataset.json with the listed entries; every relative path it names exists as a small file."""
    root.mkdir(parents=True, exist_ok=True)
    for entry in training:
        for key in ("image", "label"):
            if isinstance(entry, dict) and isinstance(entry.get(key), str) and not Path(entry[key]).is_absolute():
                (root / entry[key]).parent.mkdir(parents=True, exist_ok=True)
                (root / entry[key]).touch()
    doc = {"name": "t", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"},
           "training": training, "test": [], **extra}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def cases(n: int, patients: dict[int, str] | None = None) -> list[dict]:
    out = []
    for i in range(n):
        e = {"image": f"./imagesTr/c{i:03d}.nii.gz", "label": f"./labelsTr/c{i:03d}.nii.gz"}
        if patients and i in patients:
            e["patient"] = patients[i]
        out.append(e)
    return out


def test_paths_resolved_ids_and_test_entries(tmp_path):
    m = write_manifest(tmp_path / "d", cases(2), test=["./imagesTs/t1.nii", {"image": "imagesTs/t2.nii.gz", "x": 1}])
    data = load_manifest(m)
    assert data["training"][0] == {"image": str(tmp_path / "d/imagesTr/c000.nii.gz"),
                                   "label": str(tmp_path / "d/labelsTr/c000.nii.gz"), "id": "c000"}
    assert [(e["id"], e["image"]) for e in data["test"]] == [
        ("t1", str(tmp_path / "d/imagesTs/t1.nii")), ("t2", str(tmp_path / "d/imagesTs/t2.nii.gz"))]
    assert data["labels"] == {"0": "background", "1": "organ"}


def test_nnunet_v2_labels_are_turned_into_msd_form(tmp_path):
    m = write_manifest(tmp_path, cases(1), labels={"background": 0, "liver": 1, "tumour": 2})
    assert load_manifest(m)["labels"] == {"0": "background", "1": "liver", "2": "tumour"}


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    ('{"training": []}', "lacks 'labels'"),
    ('{"labels": {"0": "background"}}', "lacks 'training'"),
    ('[1, 2]', "not a manifest"),
    ('{"labels": {"0": "background"}, "training": [], "channel_names": ["CT"]}', "'channel_names' must be an object"),
])
def test_broken_manifest_is_one_line_input_error(tmp_path, text, problem):
    m = tmp_path / "dataset.json"
    m.write_text(text)
    with pytest.raises(InputError, match=problem) as e:
        load_manifest(m)
    assert str(e.value).startswith(str(m)) and "\n" not in str(e.value)
    assert validate(m) == [str(e.value)]


def _escape_dotdot(tmp_path):
    (tmp_path / "outside.nii.gz").touch()
    return "../outside.nii.gz"


def _escape_absolute(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/x.nii.gz").touch()
    return str(tmp_path / "elsewhere/x.nii.gz")


def _escape_symlink(tmp_path):
    (tmp_path / "secret.nii.gz").touch()
    (tmp_path / "d/imagesTr").mkdir(parents=True, exist_ok=True)
    (tmp_path / "d/imagesTr/link.nii.gz").symlink_to(tmp_path / "secret.nii.gz")
    return "./imagesTr/link.nii.gz"


@pytest.mark.parametrize("make", [_escape_dotdot, _escape_absolute, _escape_symlink])
def test_paths_escaping_the_manifest_folder_are_refused_unless_allowed(tmp_path, make):
    image = make(tmp_path)
    training = [{"image": image, "label": "./labelsTr/c.nii.gz"}]
    m = write_manifest(tmp_path / "d", training)
    with pytest.raises(InputError, match=r"outside the manifest's folder .* \"allow_outside\": true") as e:
        load_manifest(m)
    assert str(e.value).startswith(f"{m}: training[0]")
    [line] = [p for p in validate(m) if "outside the manifest's folder" in p]
    assert image in line
    assert Path(load_manifest(m, allow_outside=True)["training"][0]["image"]).is_file()
    flagged = write_manifest(tmp_path / "d", training, allow_outside=True)
    entry = load_manifest(flagged)["training"][0]
    assert Path(entry["image"]).is_file() and entry["id"] == Path(image).name[: -len(".nii.gz")]


def test_symlink_inside_the_folder_is_fine(tmp_path):
    m = write_manifest(tmp_path, cases(1))
    (tmp_path / "imagesTr/alias.nii.gz").symlink_to(tmp_path / "imagesTr/c000.nii.gz")
    m = write_manifest(tmp_path, [{"image": "imagesTr/alias.nii.gz", "label": "labelsTr/c000.nii.gz"}])
    assert load_manifest(m)["training"][0]["id"] == "alias"


def test_duplicate_ids_and_bad_entries_are_listed(tmp_path):
    m = write_manifest(tmp_path, [*cases(2), cases(1)[0], {"image": "imagesTr/c009.nii.gz"}, 7], numTraining=9)
    problems = validate(m)
    assert "training[2] c000: duplicate id (also training[0])" in problems
    assert "training[3] c009: 'label' must be a file path string, got None" in problems
    assert any(p.startswith("training[4] #4: entry must be an object") for p in problems)
    assert "numTraining is 9 but 'training' has 5 entries" in problems
    with pytest.raises(InputError, match=r"duplicate id .*\(and 3 more problem"):
        load_manifest(m)


# ------------------------------------------------------------------------------------------ splits


def _patients() -> dict[int, str]:
    """30 cases: patient P0 has 4 studies, P1 and P2 have 3, P3 has 2, the rest have none."""
    owners = ["P0"] * 4 + ["P1"] * 3 + ["P2"] * 3 + ["P3"] * 2
    return {i * 2: p for i, p in enumerate(owners)}  # spread over the list, not adjacent


def _folds(splits_file: Path) -> list[dict]:
    return json.loads(splits_file.read_text())["folds"]


def test_splits_are_patient_grouped_balanced_and_cover_every_case_once(tmp_path):
    patients = _patients()
    m = write_manifest(tmp_path, cases(30, patients))
    out = write_splits(m, k=5, seed=3)
    assert out == tmp_path / "splits.json"
    saved = json.loads(out.read_text())
    assert (saved["k"], saved["seed"], len(saved["folds"])) == (5, 3, 5)
    vals = [f["val"] for f in saved["folds"]]
    everyone = [f"c{i:03d}" for i in range(30)]
    assert sorted(sum(vals, [])) == everyone  # every case in exactly one val
    for f in saved["folds"]:
        assert sorted(f["train"] + f["val"]) == everyone and not set(f["train"]) & set(f["val"])
    fold_of = {cid: k for k, v in enumerate(vals) for cid in v}
    for p in set(patients.values()):
        assert len({fold_of[f"c{i:03d}"] for i, q in patients.items() if q == p}) == 1, p
    assert max(map(len, vals)) - min(map(len, vals)) <= 1


def test_splits_are_deterministic_per_seed_and_not_sorted_slices(tmp_path):
    m = write_manifest(tmp_path, cases(20))
    first = _folds(write_splits(m, k=4, seed=0))
    assert _folds(write_splits(m, k=4, seed=0)) == first
    assert _folds(write_splits(m, k=4, seed=1)) != first
    ids = [f"c{i:03d}" for i in range(20)]
    assert [f["val"] for f in first] != [ids[i * 5:(i + 1) * 5] for i in range(4)]


def test_explicit_folds_are_respected_and_conflicts_refused(tmp_path):
    training = cases(12, {0: "A", 5: "A"})
    training[0]["fold"] = 2
    training[7]["fold"] = 0
    m = write_manifest(tmp_path, training)
    vals = [f["val"] for f in _folds(write_splits(m, k=3, seed=0))]
    assert {"c000", "c005"} <= set(vals[2]) and "c007" in vals[0]
    training[5]["fold"] = 1
    m = write_manifest(tmp_path, training)
    with pytest.raises(InputError, match="patient 'A' is pinned to fold 2"):
        write_splits(m, k=3)
    training[5]["fold"] = 3
    m = write_manifest(tmp_path, training)
    with pytest.raises(InputError, match=r"fold 3 is not an integer in 0..2"):
        write_splits(m, k=3)


def test_datalist_roles_follow_the_split_and_pass_extra_keys(tmp_path):
    training = cases(10, {1: "P", 2: "P"})
    for e in training:
        e["instance"] = e["label"].replace("labelsTr", "instancesTr")
        e["site"] = "a"
    m = write_manifest(tmp_path, training, test=["imagesTs/new.nii.gz"])
    val = datalist(m, "val", fold=1, folds=3, seed=0)
    train = datalist(str(m), "train", fold=1, folds=3, seed=0)
    assert {d["id"] for d in val} | {d["id"] for d in train} == {f"c{i:03d}" for i in range(10)}
    assert not {d["id"] for d in val} & {d["id"] for d in train}
    item = train[0]
    assert set(item) == {"image", "label", "instance", "site", "id"}  # patient/fold are not passed on
    assert item["instance"] == str(tmp_path / "instancesTr" / f"{item['id']}.nii.gz")
    assert len(datalist(m, "all")) == 10
    assert datalist(m, "test") == [{"image": str(tmp_path / "imagesTs/new.nii.gz"), "id": "new"}]
    assert datalist(m, "train", folds=1) == datalist(m, "all") and datalist(m, "val", folds=1) == []
    with pytest.raises(UsageError, match="role"):
        datalist(m, "validation")
    with pytest.raises(UsageError, match="fold 3 is not in 0..2"):
        datalist(m, "val", fold=3, folds=3)


def test_datalist_reads_a_matching_splits_json_and_ignores_a_stale_one(tmp_path):
    m = write_manifest(tmp_path, cases(6))
    splits = write_splits(m, k=2, seed=0)
    doc = json.loads(splits.read_text())
    everyone = [f"c{i:03d}" for i in range(6)]
    doc["folds"] = [{"train": everyone[2:], "val": everyone[:2]}, {"train": everyone[:2], "val": everyone[2:]}]
    splits.write_text(json.dumps(doc))  # a hand-made split, as nnU-Net allows
    assert [d["id"] for d in datalist(m, "val", 0, folds=2, seed=0)] == everyone[:2]
    in_memory = [d["id"] for d in datalist(m, "val", 0, folds=2, seed=5)]  # other seed: not this file
    assert in_memory == sorted(_folds(write_splits(m, k=2, seed=5))[0]["val"])


def test_a_seeded_split_into_other_folds_gives_way_to_the_folds_asked_for_and_a_hand_made_one_does_not(
        tmp_path, caplog):
    """`segpipe plan` writes a 5-fold split computed from the seed: `crossval --folds 2` on the
    planned bundle was refused until that file was deleted, though it holds nothing the seed does
    not give. Such a file now gives way (the 2 folds are split from the same seed); one edited by
    hand into 5 folds is still refused for 2, so a chosen split is never dropped silently."""
    from pipeline.crossval import fold_cases
    from pipeline.splits import compute_splits

    m = write_manifest(tmp_path / "data", cases(10))
    ids = {f"c{i:03d}" for i in range(10)}
    planned = write_splits(m, k=5, seed=0)
    with caplog.at_level(logging.INFO, logger="pipeline.splits"):
        assert split_file(m, 2, 0, ids, strict=True) == (None, None)
    assert "splits.json is the 5-fold split computed from seed 0; 2 folds are split from the same seed" in caplog.text
    assert "WARNING" not in caplog.text
    two = [sorted(f["val"]) for f in compute_splits(m, 2, 0)["folds"]]
    assert [sorted(v) for v in fold_cases(m, 2, 0)] == two
    assert split_file(m, 5, 0, ids, strict=True)[1] == planned  # the folds it was written for: read
    doc = json.loads(planned.read_text())
    doc["folds"][0]["val"], doc["folds"][1]["val"] = doc["folds"][1]["val"], doc["folds"][0]["val"]
    doc["folds"][0]["train"], doc["folds"][1]["train"] = doc["folds"][1]["train"], doc["folds"][0]["train"]
    planned.write_text(json.dumps(doc))  # a hand-made 5-fold split (two folds swapped)
    with pytest.raises(InputError, match=r"splits\.json: does not match .*it has 5 folds, not 2"):
        split_file(m, 2, 0, ids, strict=True)
    write_splits(m, k=5, seed=1)  # a seed's split, but not the seed asked for
    with pytest.raises(InputError, match=r"it has 5 folds, not 2"):
        split_file(m, 2, 0, ids, strict=True)
    everyone = sorted(ids)  # a 1-fold file, and one the seed cannot have made: training splits in memory
    planned.write_text(json.dumps({"k": 1, "seed": 0, "folds": [{"train": everyone[5:], "val": everyone[:5]}]}))
    assert len(datalist(m, "val", 0, folds=2, seed=0)) == 5
    write_splits(m, k=3, seed=0)
    doc = json.loads(m.read_text())
    doc["training"][0]["fold"] = 4  # pinned since, to a fold a 3-fold split has not
    m.write_text(json.dumps(doc))
    assert "c000" in {d["id"] for d in datalist(m, "val", 4, folds=5, seed=0)}  # not "fold 4 is not ... in 0..2"


def test_a_splits_file_of_other_cases_is_refused_and_another_datasets_passed_by(tmp_path, caplog):
    """A splits file that lists the manifest's cases but not exactly them (a case added since it was
    written) is refused naming it for cross-validation (strict), and training splits in memory
    with a warning saying why; a bundle's splits file that lists none of them (the dataset the
    bundle was planned on) gives way to the manifest's own."""
    m = write_manifest(tmp_path / "data", cases(6))
    everyone = [f"c{i:03d}" for i in range(6)]
    planned = tmp_path / "bundle" / "splits.json"
    planned.parent.mkdir()
    planned.write_text(json.dumps({"k": 2, "seed": 0, "folds": [
        {"train": everyone[2:5], "val": everyone[:2]}, {"train": everyone[:2], "val": everyone[2:5]}]}))
    ids = set(everyone)
    with pytest.raises(InputError, match=r"bundle/splits\.json: does not match .*dataset\.json \(case c005 missing"):
        split_file(m, 2, 0, ids, planned, strict=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.splits"):
        computed = [d["id"] for d in datalist(m, "val", 0, folds=2, seed=0, splits=planned)]
        datalist(m, "train", 0, folds=2, seed=0, splits=planned)  # a training reads both lists: warned once
    assert "bundle/splits.json does not match k=2, seed=0 (case c005 missing" in caplog.text
    assert caplog.text.count("splitting in memory") == 1
    assert len(computed) == 3 and computed != everyone[:2]  # the split computed from the seed
    own = write_splits(m, k=2, seed=0)
    doc = json.loads(own.read_text())
    doc["folds"] = [{"train": everyone[2:], "val": everyone[:2]}, {"train": everyone[:2], "val": everyone[2:]}]
    own.write_text(json.dumps(doc))  # hand-made
    other = [f"x{i:03d}" for i in range(4)]
    planned.write_text(json.dumps([{"train": other[2:], "val": other[:2]}, {"train": other[:2], "val": other[2:]}]))
    assert [d["id"] for d in datalist(m, "val", 0, folds=2, seed=0, splits=planned)] == everyone[:2]
    doc["folds"][1]["train"] = everyone[:1]  # c001 in neither list of fold 1
    own.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"data/splits\.json: does not match .*fold 1 does not list every case"):
        split_file(m, 2, 0, ids, strict=True)


def test_nnunet_splits_final_json_is_read_and_a_leaking_fold_refused(tmp_path):
    """nnU-Net's splits_final.json (a bare list of folds, no seed) gives the same folds as an nnU-Net
    run on the same cases, whatever the seed; a case in a fold's train and val lists is refused."""
    m = write_manifest(tmp_path, cases(6))
    everyone = [f"c{i:03d}" for i in range(6)]
    nnunet = [{"train": everyone[:3], "val": everyone[3:]}, {"train": everyone[3:], "val": everyone[:3]}]
    (tmp_path / "splits.json").write_text(json.dumps(nnunet))
    for seed in (0, 7):
        assert [d["id"] for d in datalist(m, "val", 0, folds=2, seed=seed)] == everyone[3:]
        assert [d["id"] for d in datalist(m, "train", 1, folds=2, seed=seed)] == everyone[3:]
    assert [d["id"] for d in datalist(m, "val", 0, folds=3)] != everyone[3:]  # 3 folds asked: not this file
    nnunet[1]["train"] = everyone[2:]
    (tmp_path / "other.json").write_text(json.dumps(nnunet))
    with pytest.raises(InputError, match=r"other.json: fold 1: case c002 is in both its train and val lists"):
        datalist(m, "val", 0, folds=2, splits=tmp_path / "other.json")


# --------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_msd_task04_loads_unchanged_and_validates_clean():
    if not TASK04.is_file():
        pytest.skip(f"real data not present: {TASK04}")
    raw = json.loads(TASK04.read_text())
    data = load_manifest(TASK04)
    assert len(data["training"]) == len(raw["training"]) == 208 and data["test"] == []
    folder = TASK04.resolve().parent
    assert [(e["image"], e["label"]) for e in data["training"]] == [
        (str(folder / r["image"][2:]), str(folder / r["label"][2:])) for r in raw["training"]]  # "./imagesTr/..."
    assert data["training"][0]["id"] == "hippocampus_001" and data["labels"]["2"] == "Posterior"
    start = time.monotonic()
    assert validate(TASK04) == []
    assert time.monotonic() - start < 20
    vals = Counter(d["id"] for f in range(5) for d in datalist(TASK04, "val", f, 5, 0))
    assert len(vals) == 208 and set(vals.values()) == {1}


@pytest.mark.realdata
def test_shipped_example_manifest_reaches_outside_only_because_it_says_so(tmp_path):
    example = Path(__file__).resolve().parents[1] / "data_manifests" / "hippocampus_example.json"
    doc = json.loads(example.read_text())
    assert doc["allow_outside"] is True
    data = load_manifest(example)
    assert [e["id"] for e in data["test"]] == ["hippocampus_011"]
    if not TASK04.is_file():
        pytest.skip(f"real data not present: {TASK04}")
    assert validate(example) == []
    del doc["allow_outside"]  # the same files, named absolutely from a manifest elsewhere
    for e in doc["training"]:
        e.update({k: str((example.parent / e[k]).resolve()) for k in ("image", "label")})
    doc["test"] = [str((example.parent / t).resolve()) for t in doc["test"]]
    (tmp_path / "no_flag.json").write_text(json.dumps(doc))
    assert len(validate(tmp_path / "no_flag.json")) == 11  # 5 images, 5 labels, 1 test image


def test_an_image_may_be_a_list_of_channel_files(tmp_path):
    entry = {"image": ["./imagesTr/c_0000.nii.gz", "imagesTr/c_0001.nii.gz"], "label": "./labelsTr/c.nii.gz"}
    m = write_manifest(tmp_path / "d", [entry], test=[{"image": ["imagesTs/t_0000.nii.gz", "imagesTs/t_0001.nii.gz"]}])
    data = load_manifest(m)
    (tr,), (ts,) = data["training"], data["test"]
    assert tr["id"] == "c" and tr["image"] == [str(tmp_path / "d/imagesTr/c_0000.nii.gz"),
                                                str(tmp_path / "d/imagesTr/c_0001.nii.gz")]
    assert ts["id"] == "t" and len(ts["image"]) == 2
    assert datalist(m, "all")[0]["image"] == tr["image"]


@pytest.mark.parametrize("image, problem", [
    ([], "'image' list must hold one file path per channel"),
    (["./imagesTr/c_0000.nii.gz", 3], "'image' list must hold one file path per channel"),
    (["./imagesTr/c_0000.nii.gz", "../c_0001.nii.gz"], "outside the manifest's folder"),
])
def test_bad_channel_lists_are_named(tmp_path, image, problem):
    m = write_manifest(tmp_path / "d", [{"image": image, "label": "./labelsTr/c.nii.gz"}])
    with pytest.raises(InputError, match=problem) as e:
        load_manifest(m)
    assert str(e.value).startswith(f"{m}: training[0]") and "\n" not in str(e.value)


def test_one_channel_nnunet_names_get_the_labels_id(tmp_path):
    m = write_manifest(tmp_path, [{"image": "imagesTr/la_003_0000.nii.gz", "label": "labelsTr/la_003.nii.gz"},
                                  {"image": "imagesTr/scan_0000.nii.gz", "label": "labelsTr/other.nii.gz"}])
    assert [e["id"] for e in load_manifest(m)["training"]] == ["la_003", "scan_0000"]


def nnunet_v2_dataset(root: Path, n: int = 3) -> Path:
    """A two-channel nnU-Net v2 raw dataset (imagesTr/<case>_000X, labelsTr/<case>; a dataset.json
    that lists no cases) made from the synthetic mr2ch studies; returns its folder."""
    from pipeline.synthetic import write_dataset

    manifest = write_dataset("mr2ch", n, root, shape=(16, 16, 8), channel_layout="files")
    msd = json.loads(manifest.read_text())
    (root / "msd.json").write_text(json.dumps(msd))  # the same cases as an MSD list, to compare with
    manifest.write_text(json.dumps({"name": "Dataset001_T", "channel_names": msd["channel_names"],
                                    "labels": {v: int(k) for k, v in msd["labels"].items()},
                                    "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def test_an_nnunet_v2_raw_dataset_loads_as_it_is(tmp_path, monkeypatch):
    from pipeline.manifest import manifest_hash

    root = nnunet_v2_dataset(tmp_path / "Dataset001_T")
    for hidden in ("imagesTr/._mr2ch_000_0000.nii.gz", "labelsTr/._mr2ch_000.nii.gz"):  # a Mac's copy: no case
        (root / hidden).write_bytes(b"\0\5\26\7")
    before = manifest_hash(root / "dataset.json")
    (root / "imagesTs").mkdir()
    for c in (0, 1):
        (root / "imagesTs" / f"new_{c:04d}.nii.gz").write_bytes((root / f"imagesTr/mr2ch_002_{c:04d}.nii.gz").read_bytes())
    v2, msd = load_manifest(root / "dataset.json"), load_manifest(root / "msd.json")
    assert [(e["id"], e["image"], e["label"]) for e in v2["training"]] == \
        [(e["id"], e["image"], e["label"]) for e in msd["training"]]
    assert [len(e["image"]) for e in v2["training"]] == [2, 2, 2]
    assert v2["labels"] == msd["labels"] and validate(root / "dataset.json") == []
    assert manifest_hash(root / "dataset.json") != before  # the cases are part of the provenance
    (test,) = v2["test"]
    assert test["id"] == "new" and test["image"] == [str(root / "imagesTs/new_0000.nii.gz"),
                                                     str(root / "imagesTs/new_0001.nii.gz")]
    # the 'dataset' object names the files instead (paths relative to the folder, $VARS expanded)
    monkeypatch.setenv("T_ROOT", str(root))
    doc = json.loads((root / "dataset.json").read_text())
    doc["dataset"] = {"a": {"images": ["$T_ROOT/imagesTr/mr2ch_001_0000.nii.gz", "imagesTr/mr2ch_001_0001.nii.gz"],
                            "label": "labelsTr/mr2ch_001.nii.gz"}}
    doc["numTraining"] = 1
    (root / "dataset.json").write_text(json.dumps(doc))
    (a,) = load_manifest(root / "dataset.json")["training"]
    assert a["id"] == "a" and a["image"] == msd["training"][1]["image"] and a["label"] == msd["training"][1]["label"]


@pytest.mark.parametrize("break_it, problem", [
    (lambda r: (r / "imagesTr/mr2ch_001_0001.nii.gz").unlink(),
     "imagesTr/mr2ch_001: channel files [0] but channel_names declares 2 channel(s)"),
    (lambda r: (r / "imagesTr/mr2ch_001_0001.nii.gz").rename(r / "imagesTr/mr2ch_001.nii.gz"),
     "imagesTr/mr2ch_001.nii.gz: not named <case>_<XXXX>.nii.gz"),
    (lambda r: (r / "labelsTr/mr2ch_000.nii.gz").rename(r / "labelsTr/other.nii.gz"),
     "labelsTr/other.nii.gz: a label without an image in imagesTr"),
    (lambda r: [(r / f"imagesTr/mr2ch_002_000{c}.nii.gz").unlink() for c in (0, 1)],
     "numTraining is 3 but imagesTr has 2 cases"),
])
def test_a_broken_nnunet_v2_layout_is_named(tmp_path, break_it, problem):
    root = nnunet_v2_dataset(tmp_path / "d")
    break_it(root)
    assert any(p.startswith(problem) for p in validate(root / "dataset.json")), validate(root / "dataset.json")
    with pytest.raises(InputError) as e:
        load_manifest(root / "dataset.json")
    assert str(e.value).startswith(f"{root / 'dataset.json'}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("change, error", [
    ({"file_ending": ".nrrd"}, "file_ending '.nrrd': segpipe reads NIfTI images"),
    ({"labels": {"background": 0, "tumour": [1, 2]}}, "label 'tumour' is a region"),
    ({"labels": {"background": 0, "organ": 1, "ignore": 2}}, "label 'ignore' (nnU-Net v2's ignore label"),
])
def test_what_segpipe_cannot_train_from_an_nnunet_v2_dataset_is_one_line(tmp_path, change, error):
    root = nnunet_v2_dataset(tmp_path / "d", n=2)
    doc = {**json.loads((root / "dataset.json").read_text()), **change}
    (root / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=re.escape(error)):
        load_manifest(root / "dataset.json")
    (root / "imagesTr").rename(root / "elsewhere")
    doc["file_ending"] = ".nii.gz"
    (root / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="neither 'training' .* nor 'dataset' or an imagesTr folder"):
        load_manifest(root / "dataset.json")


def test_the_cli_takes_a_dataset_folder_for_its_manifest(tmp_path, capsys):
    from pipeline.cli import main

    root = nnunet_v2_dataset(tmp_path / "Dataset001_T", n=4)
    assert main(["validate", str(root), "--folds", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{root / 'dataset.json'}: ok")
    assert (root / "splits.json").is_file() and main(["fingerprint", str(root)]) == 0
    with pytest.raises(SystemExit) as e:
        main(["validate", str(tmp_path)])
    assert e.value.code == 2 and f"{tmp_path}: a folder without a dataset.json" in capsys.readouterr().err
