"""Where a segmentation's remaining Dice is lost, per class, pooled over a folder of masks scored
against a labelled manifest (e.g. the out-of-fold masks of ``segpipe crossval``): the share of
error voxels within one voxel of the reference surface (boundary disagreement), and the share in
slices along ``--axis`` that only one of the two masks reaches (extent: where the contour starts
and stops). Nothing is trained or predicted; the masks are read as they are, after the
post-processing named by ``--keep-largest``.

    .venv/bin/python benchmarks/error_location.py bundles/headneck_ct_oar/runs_cv_ft/oof \\
        --manifest ../shared/data/OpenKBP_HN_CT/dataset.json --keep-largest --axis 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from pipeline.postprocess import label_cleanup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("masks", type=Path, help="folder of <id>.nii.gz label masks")
    ap.add_argument("--manifest", type=Path, required=True, help="MSD dataset.json with the reference labels")
    ap.add_argument("--keep-largest", action="store_true", help="keep the largest component of each class first")
    ap.add_argument("--axis", type=int, default=2, help="slice axis for the extent share (2: axial in RAS/LPS)")
    a = ap.parse_args()
    m = json.loads(a.manifest.read_text())
    names = {int(k): v for k, v in m["labels"].items() if int(k) > 0}
    clean = label_cleanup({"keep_largest": sorted(names)} if a.keep_largest else None)
    tot = {n: np.zeros(5) for n in names.values()}  # tp, fp, fn, errors near the surface, errors in extent slices
    cases = 0
    for e in m["training"]:
        sid = Path(e["label"]).name.removesuffix(".nii.gz")
        f = a.masks / f"{sid}.nii.gz"
        if not f.is_file():
            continue
        cases += 1
        ref = np.asarray(nib.load(str(a.manifest.parent / e["label"])).dataobj).astype(np.int16)
        pred = np.asarray(clean(torch.as_tensor(np.asarray(nib.load(str(f)).dataobj).astype(np.int16))[None])[0])
        other = tuple(i for i in range(ref.ndim) if i != a.axis)
        for c, n in names.items():
            p, r = pred == c, ref == c
            err = p ^ r
            band = ndimage.binary_dilation(r) & ~ndimage.binary_erosion(r)
            only = np.moveaxis(err, a.axis, 0)[p.any(other) ^ r.any(other)]
            tot[n] += [(p & r).sum(), (p & ~r).sum(), (~p & r).sum(), (err & band).sum(), only.sum()]
    print(f"{cases} cases of {a.masks} against {a.manifest}{' (keep-largest per class)' if a.keep_largest else ''}\n")
    print("| class | pooled Dice | error voxels within 1 voxel of the surface | in slices only one mask reaches |")
    print("|---|---:|---:|---:|")
    for n, (tp, fp, fn, near, ext) in tot.items():
        print(f"| {n} | {2 * tp / (2 * tp + fp + fn):.3f} | {near / (fp + fn):.0%} | {ext / (fp + fn):.0%} |")


if __name__ == "__main__":
    main()
