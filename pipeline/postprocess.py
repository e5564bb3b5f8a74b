"""After the network: probabilities back to the source geometry, labels, clean-up, the mask file.

One implementation serves ``segpipe predict`` and every bundle's ``configs/inference.json``
(``python -m monai.bundle run``): the bundle's ``postprocessing`` id is

    Compose([InvertToLabelsd(keys="pred", transform=@preprocessing, ...),   # labels, source grid
             SaveMaskd(keys="pred", output_dir=@prediction_dir, ...)])       # <id>.nii.gz

and ``pipeline.predict`` runs that same Compose on each study, so both routes write the same
masks under the same names.

- :func:`invert_to_labels`: class probabilities in the preprocessed grid -> uint8 labels in the
  source grid, inverting one channel at a time with a running argmax (bounded memory).
- :func:`label_cleanup`: the bundle's ``postprocess`` id names the labels to clean:
  ``{"keep_largest": [1, 3], "fill_holes": [1]}`` keeps only the largest connected component of
  labels 1 and 3 and fills the holes of label 1; ``{"keep_largest_foreground": true}`` keeps the
  largest connected component of all foreground labels taken together (nnU-Net's first
  candidate). Empty lists (the default) change nothing; ``segpipe crossval`` chooses on
  out-of-fold data.
- :func:`label_volumes`: voxel counts and volumes in mL (areas in mm² for 2D images) per label (``report.csv``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, FillHoles, KeepLargestConnectedComponent, MapTransform

PROBABILITIES_SUFFIX = "_probabilities"


def label_cleanup(options: Mapping[str, Sequence[int]] | None) -> Callable[[Any], Any]:
    """A callable on a (1, *spatial) label map applying ``options`` (see the module docstring);
    the identity when no labels are named. Unknown option names are a ValueError (typos)."""
    options = dict(options or {})
    unknown = set(options) - {"keep_largest", "fill_holes", "keep_largest_foreground"}
    if unknown:
        raise ValueError(f"postprocess: unknown option(s) {sorted(unknown)}; use keep_largest, "
                         "keep_largest_foreground, fill_holes")
    steps: list[Callable] = []
    if options.get("keep_largest_foreground"):
        steps.append(_largest_foreground)
    if options.get("keep_largest"):
        steps.append(KeepLargestConnectedComponent(applied_labels=list(options["keep_largest"]),
                                                   is_onehot=False, independent=True))
    if options.get("fill_holes"):
        steps.append(FillHoles(applied_labels=list(options["fill_holes"])))
    return Compose(steps) if steps else (lambda x: x)


def _largest_foreground(labels: torch.Tensor) -> torch.Tensor:
    """Zero every foreground voxel outside the largest connected component of all foreground."""
    keep = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, independent=True)(
        (torch.as_tensor(labels) > 0).to(torch.uint8))
    return labels * torch.as_tensor(keep).to(labels.dtype)


#: a label's size in report.csv, index.html and previews, by the image's spatial dims: (column prefix, unit)
SIZE_COLUMNS = {3: ("ml", "mL"), 2: ("mm2", "mm²")}


def voxel_size(affine: Any, spatial_dims: int) -> tuple[str, float]:
    """(column prefix, size of one voxel in its unit) for an image of ``spatial_dims`` with
    ``affine`` (its spatial part, any size from (d, d) up): mL for a volume, mm² for a 2D image
    (its pixels' area; a volume in mL made of a 2D image's nominal slice thickness means nothing)."""
    linear = np.asarray(affine, dtype=float)[:spatial_dims, :spatial_dims]
    size = abs(float(np.linalg.det(linear)))
    return SIZE_COLUMNS[2 if spatial_dims == 2 else 3][0], size if spatial_dims == 2 else size / 1000


def label_volumes(labels: torch.Tensor | Any, names: Sequence[str], voxel_ml: float,
                  prefix: str = "ml") -> dict[str, float | int]:
    """``voxels_<name>`` and ``<prefix>_<name>`` (``ml_``: mL, ``mm2_``: mm² for a 2D image; see
    ``voxel_size``; ``voxel_ml`` is one voxel's size in that unit) for every label but background."""
    flat = torch.as_tensor(labels).reshape(-1)
    flat = flat if flat.dtype == torch.uint8 else flat.long()  # no int64 copy of a uint8 mask
    counts = torch.bincount(flat, minlength=len(names))
    out: dict[str, float | int] = {}
    for i, name in enumerate(names):
        if i == 0:
            continue
        out[f"voxels_{name}"] = int(counts[i])
        out[f"{prefix}_{name}"] = round(int(counts[i]) * voxel_ml, 3)
    return out


def invert_to_labels(probs: torch.Tensor, image: MetaTensor, preprocessing: Any,
                     keep_probabilities: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class probabilities (K, *spatial) in the preprocessed grid -> labels (1, *source) uint8 in
    the source geometry: ``monai.transforms.Invertd`` undoes the preprocessing (resampling with
    bilinear interpolation of the probabilities, reorientation) and the argmax is taken there.

    Memory: the channels are inverted one at a time with a running maximum, so the source-sized
    arrays alive at once are one probability channel, the running maximum and the uint8 labels,
    not K float32 channels plus an int64 argmax (a 512x512x300 CT: ~0.7 GB instead of ~1.9 GB
    for 4 classes). The result equals the argmax of the whole inverted stack (first maximum wins,
    as in ``torch.argmax``). ``keep_probabilities`` inverts the whole stack at once instead and
    returns it too (for ``save_probabilities``)."""
    from monai.transforms import Invertd

    invert = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True)
    probs = probs if isinstance(probs, MetaTensor) else MetaTensor(probs)  # Invertd skips plain tensors
    if keep_probabilities:
        inverted = invert({"image": image, "pred": probs})["pred"]
        return torch.argmax(inverted, dim=0, keepdim=True).to(torch.uint8), torch.as_tensor(inverted)

    def channel(c: int) -> torch.Tensor:
        return torch.as_tensor(invert({"image": image, "pred": probs[c:c + 1]})["pred"])

    best = channel(0)
    labels = torch.zeros(best.shape, dtype=torch.uint8)
    for c in range(1, probs.shape[0]):
        p = channel(c)
        labels[p > best] = c
        torch.maximum(best, p, out=best)
    return labels, None


class InvertToLabelsd(MapTransform):
    """Dictionary transform: ``d[key]`` (K, *preprocessed) logits or probabilities -> uint8 labels
    (1, *source grid) with :func:`invert_to_labels`, then :func:`label_cleanup`.

    Args:
        keys: the prediction key(s), e.g. ``"pred"``.
        transform: the deterministic preprocessing to undo (the bundle's ``@preprocessing``).
        orig_key: the key whose applied operations are inverted (the preprocessed image).
        softmax: apply a softmax over the channels first (the inferer gave logits, not
            probabilities: ``"$not @inferer.outputs_probabilities"`` in a bundle).
        postprocess: the clean-up options of :func:`label_cleanup`.
        save_probabilities: truthy to keep the inverted probabilities in ``d[key + "_probabilities"]``
            for :class:`SaveMaskd` (the whole stack is then inverted at once).

    Example::

        InvertToLabelsd("pred", transform=preprocessing, softmax=True)({"image": image, "pred": logits})
    """

    def __init__(self, keys: KeysCollection, transform: Any, orig_key: str = "image", softmax: bool = True,
                 postprocess: Mapping[str, Sequence[int]] | None = None, save_probabilities: bool | str = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform, self.orig_key, self.softmax = transform, orig_key, bool(softmax)
        self.cleanup = label_cleanup(postprocess)
        self.keep_probabilities = bool(save_probabilities)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.orig_key]
        for key in self.key_iterator(d):
            pred = d[key]
            probs = torch.softmax(pred.float(), dim=0) if self.softmax else pred
            labels, inverted = invert_to_labels(probs, image, self.transform, self.keep_probabilities)
            meta = {"affine": image.meta.get("original_affine"),
                    "filename_or_obj": image.meta.get("filename_or_obj")}
            d[key] = MetaTensor(self.cleanup(labels), meta=meta)
            if inverted is not None:
                d[f"{key}{PROBABILITIES_SUFFIX}"] = inverted
        return d


class SaveMaskd(MapTransform):
    """Dictionary transform: write the labels ``d[key]`` (1, *source) as ``output_dir/<id>.nii.gz``
    (uint8, the source file's affine, qform and sform; ``pipeline.predict_io.write_mask``: atomic)
    and, where :class:`InvertToLabelsd` kept them, the probabilities as ``<id>_probs.nii.gz``.
    The id is ``d[id_key]`` (``segpipe predict`` and the bundles' datalists set it), else the
    source file's name without its NIfTI suffix; ``d["mask_file"]``, where given, names the mask
    file instead (``segpipe predict --format dicom-seg`` writes it under a temporary name, so an
    earlier ``<id>.nii.gz`` stays). Sets ``d["output"]`` to the mask's path.

    Args:
        keys: the label key(s), e.g. ``"pred"``.
        output_dir: the folder (created when missing).
        source_key: the key whose ``meta["filename_or_obj"]`` names the source image.
        id_key: the key holding the study id.
        save_probabilities: truthy (``true`` or ``"float32"``) to write the probabilities that
            :class:`InvertToLabelsd` kept, as float32 (NIfTI has no float16).
    """

    def __init__(self, keys: KeysCollection, output_dir: Path | str, source_key: str = "image", id_key: str = "id",
                 save_probabilities: bool | str = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.source_key, self.id_key = Path(output_dir), source_key, id_key
        self.save_probabilities = bool(save_probabilities)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from pipeline.predict_io import write_mask, write_probabilities
        from pipeline.studies import study_id

        d = dict(data)
        meta = d[self.source_key].meta
        source = Path(str(meta["filename_or_obj"]))
        sid = str(d.get(self.id_key) or study_id(source))
        affine = np.asarray(meta.get("original_affine"), dtype=float)
        for key in self.key_iterator(d):
            labels = torch.as_tensor(d[key])[0].numpy().astype(np.uint8, copy=False)
            probs = d.get(f"{key}{PROBABILITIES_SUFFIX}")
            if probs is not None and self.save_probabilities:  # before the mask, which marks the study done
                write_probabilities(torch.as_tensor(probs).numpy(), source, self.output_dir / f"{sid}_probs.nii.gz",
                                    affine=affine)
            name = str(d.get("mask_file") or f"{sid}.nii.gz")
            d["output"] = str(write_mask(labels, source, self.output_dir / name, affine))
        return d
