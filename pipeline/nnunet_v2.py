"""nnU-Net v2 raw datasets: the cases of a dataset.json that lists none.

nnU-Net v2's ``dataset.json`` names channels, labels, ``numTraining`` and ``file_ending`` but no
cases: nnU-Net finds them (``nnunetv2.utilities.utils.get_filenames_of_train_images_and_targets``)
in its ``dataset`` object, else as the files ``imagesTr/<case>_<XXXX><file_ending>`` (XXXX the
channel) with ``labelsTr/<case><file_ending>``. ``pipeline.manifest.parse_manifest`` reads such a
file through ``nnunet_v2_cases``, which turns them into MSD-style entries.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pipeline.errors import InputError


def nnunet_v2_cases(path: Path, raw: dict[str, Any], problems: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``{"training", "test"}`` entries of an nnU-Net v2 raw dataset, whose dataset.json lists no
    cases: they are its ``dataset`` object ({case: {"images": [...], "label": ...}}, paths relative
    to the folder, ``$VARS`` expanded) or else the files, as nnU-Net reads them
    (``get_filenames_of_train_images_and_targets``): ``imagesTr/<case>_<XXXX><file_ending>`` (channel
    XXXX) with ``labelsTr/<case><file_ending>``, and ``imagesTs`` alike for the test cases. Files that
    break the layout (a name without the channel suffix, a missing channel, a label without an
    image) are problem lines; a non-NIfTI ``file_ending`` is an InputError."""
    ending = raw.get("file_ending")
    if ending not in (".nii.gz", ".nii"):
        raise InputError(f"{path}: file_ending {ending!r}: segpipe reads NIfTI images (\".nii.gz\" or "
                         f"\".nii\"); convert the dataset's images and labels to NIfTI")
    root = path.resolve().parent
    channels = raw.get("channel_names") or raw.get("modality")
    n_channels = len(channels) if isinstance(channels, dict) and channels else None
    if isinstance(raw.get("dataset"), dict):
        training = []
        for case, e in raw["dataset"].items():
            images = e.get("images") if isinstance(e, dict) else None
            if not isinstance(images, list):
                problems.append(f"dataset[{case!r}]: must be an object with 'images' (a list) and 'label'")
                continue
            files = [os.path.expandvars(i) if isinstance(i, str) else i for i in images]
            label = e.get("label")
            training.append({"id": str(case), "image": files[0] if len(files) == 1 else files,
                             "label": os.path.expandvars(label) if isinstance(label, str) else label})
    elif (root / "imagesTr").is_dir():
        training = _v2_folder_cases(root, "imagesTr", "labelsTr", ending, n_channels, problems)
    else:
        raise InputError(f"{path}: neither 'training' (MSD) nor 'dataset' or an imagesTr folder beside it "
                         f"(nnU-Net v2)")
    test = (_v2_folder_cases(root, "imagesTs", None, ending, n_channels, problems)
            if (root / "imagesTs").is_dir() else [])
    return {"training": training, "test": test}


def _v2_folder_cases(root: Path, images: str, labels: str | None, ending: str, n_channels: int | None,
                     problems: list[str]) -> list[dict[str, Any]]:
    """Entries of the ``<case>_<XXXX><ending>`` files of ``root/images``, channels in order, each with
    ``labels/<case><ending>`` when ``labels`` is given. Hidden files (macOS's ``._<name>`` copies) are
    not cases."""
    named = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    by_case: dict[str, dict[int, str]] = {}
    for f in sorted(p.name for p in (root / images).iterdir() if p.name.endswith(ending) and p.name[0] != "."):
        m = named.fullmatch(f)
        if m is None:
            problems.append(f"{images}/{f}: not named <case>_<XXXX>{ending} (nnU-Net v2: XXXX is the channel)")
            continue
        by_case.setdefault(m.group(1), {})[int(m.group(2))] = f"{images}/{f}"
    entries = []
    for case, files in sorted(by_case.items()):
        want = n_channels or len(files)
        if sorted(files) != list(range(want)):
            problems.append(f"{images}/{case}: channel files {sorted(files)} but channel_names declares "
                            f"{want} channel(s) (0..{want - 1})")
            continue
        paths = [files[c] for c in range(want)]
        entry = {"id": case, "image": paths[0] if want == 1 else paths}
        if labels:
            entry["label"] = f"{labels}/{case}{ending}"
        entries.append(entry)
    if labels and (root / labels).is_dir():
        problems += [f"{labels}/{p.name}: a label without an image in {images}"
                     for p in sorted((root / labels).iterdir())
                     if p.name.endswith(ending) and p.name[0] != "." and p.name[:-len(ending)] not in by_case]
    return entries
