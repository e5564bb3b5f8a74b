"""Figures: a label slice beside its U-Net boundary weight map (the paper's Figure 3 c/d)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.fileio import read_label
from pipeline.preview import radiological_plane
from pipeline.weightmap import boundary_weight_map

log = logging.getLogger(__name__)

#: more distinct values than this and the file is taken for an image, not a label
MAX_LABELS = 1000


def weightmap_figure(label_path: Path, out_png: Path, w0: float = 10.0, sigma: float = 5.0,
                     border_on: str = "all", slice_index: int | None = None) -> Path:
    """Render one slice of a label file and its boundary weight map side by side as a PNG.

    The map is computed in 3D with the file's spacing (header zooms), ``sigma`` in the same units
    (mm); the slice shown is along the last axis, the middle one by default, turned as ``segpipe
    predict``'s preview shows that plane (``pipeline.preview.radiological_plane``: patient right on
    the left, anterior or superior at the top). Returns ``out_png``.

    Raises:
        InputError: the file is missing, unreadable, not 2D/3D, not a label (non-integer values,
            no foreground), or ``slice_index`` is out of range; one line naming the file.
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    label_path, out_png = Path(label_path), Path(out_png)
    label, affine, spacing = read_label(label_path, max_values=MAX_LABELS)
    index = label.shape[-1] // 2 if slice_index is None else slice_index
    if label.ndim == 3 and not -label.shape[2] <= index < label.shape[2]:
        raise InputError(f"{label_path}: slice {index} is outside 0..{label.shape[2] - 1}")
    try:
        weights = boundary_weight_map(label, spacing, w0=w0, sigma=sigma, border_on=border_on)
    except ValueError as e:
        raise InputError(f"{label_path}: {e}") from None
    where = label_path.name
    if label.ndim == 3:  # turned as segpipe predict's preview shows the plane (patient right on the left ...)
        where = f"slice {index % label.shape[2]} of {label_path.name}"
        view, label, aspect = radiological_plane(label[:, :, index], affine, 2)
        weights, spacing, where = radiological_plane(weights[:, :, index], affine, 2)[1], spacing[:2], f"{where} ({view})"
    else:  # rows are the first axis: shown transposed, x = axis 0, axis 1 upwards
        label, weights, aspect = label.T[::-1], weights.T[::-1], spacing[1] / spacing[0]
    label = label.astype(np.int64)

    fig = Figure(figsize=(10, 4.6), dpi=110, layout="constrained")
    left, right = fig.subplots(1, 2)
    classes = int(label.max()) + 1
    colours = np.vstack([[0, 0, 0, 1], colormaps["tab10"](np.arange(max(classes - 1, 1)) % 10)])
    left.imshow(label, cmap=ListedColormap(colours[:classes]), vmin=-0.5, vmax=classes - 0.5,
                interpolation="nearest", aspect=aspect)
    left.set_title(f"label ({classes - 1} foreground class{'' if classes == 2 else 'es'})")
    shown = right.imshow(weights, cmap="jet", interpolation="nearest", aspect=aspect)
    right.set_title(f"weight map: w0={w0:g}, sigma={sigma:g} mm, border on {border_on}")
    fig.colorbar(shown, ax=right, shrink=0.9, label="w(x)")
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{where}, spacing {' x '.join(f'{s:g}' for s in spacing)} mm")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    log.info("wrote %s", out_png)
    return out_png
