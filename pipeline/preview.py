"""Pictures of batch results: a PNG per study and ``index.html`` over ``report.csv``.

``segpipe predict --preview`` calls :func:`write_preview` for every study it segments
(``<id>_preview.png``: axial, coronal and sagittal slices through the centre of the largest
structure, each cut to the body, each label in its colour, a legend with its volume in mL) and :func:`write_index`
at the start, every ``INDEX_EVERY_S`` or so and at the end, so ``index.html`` in the output folder
follows the batch as it runs (while running it reloads itself every 15 s) and, written from ``report.csv``, also lists the
studies of earlier runs and of other shards. The table sorts by any column (click its header).

Views are drawn as radiologists read them: patient right on the image's left, anterior (axial)
or superior (coronal, sagittal) at the top, anterior on the left in the sagittal view, with the
voxels' real aspect ratio. Slices are read lazily from the source NIfTI (one plane each), so a
large CT costs three slices of memory, not a volume.
"""

from __future__ import annotations

import csv
import datetime
import functools
import html
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from pipeline.fileio import atomic_path, locked

log = logging.getLogger(__name__)

PREVIEW_SUFFIX = "_preview.png"
INDEX = "index.html"
#: seconds between rewrites of a running batch's index.html (it reloads every 15 s); at least 20
#: times the last rewrite took, so that a batch of many thousand studies spends under 5% on it
INDEX_EVERY_S = 10.0
#: view name -> (RAS axis held fixed, RAS axis shown down the rows, RAS axis across the columns);
#: rows and columns run towards decreasing R/A/S (left, posterior, inferior)
VIEWS = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}


def label_colours(n: int) -> list[tuple[float, float, float]]:
    """RGB (0..1) of labels 0..n-1: label k takes the k-th colour of matplotlib's tab10 (then tab20)."""
    from matplotlib import colormaps

    table = list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors)
    return [(0.0, 0.0, 0.0)] + [tuple(table[(k - 1) % len(table)][:3]) for k in range(1, n)]


@functools.lru_cache(maxsize=8)
def _font_chars(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(path).get_charmap())


def drawable(text: str) -> str:
    """``text`` with each character that matplotlib's font for it lacks (CJK in DejaVu Sans, say)
    written as its ASCII escape (``\\u60a3``): drawn, it was an empty box and a "Glyph missing"
    warning. index.html keeps the text itself (the browser has the fonts)."""
    from matplotlib.font_manager import FontProperties, findfont

    if text.isascii():
        return text
    have = _font_chars(findfont(FontProperties()))
    return "".join(c if c == "\n" or ord(c) in have else c.encode("ascii", "backslashreplace").decode("ascii")
                   for c in text)


def centre(labels: np.ndarray) -> tuple[int, ...]:
    """The voxel at the centre of mass of the largest connected structure (of the label with
    most voxels), or the volume's centre when there is no foreground."""
    from scipy import ndimage

    counts = np.bincount(labels.reshape(-1).astype(np.int64, copy=False))
    if counts.size < 2 or counts[1:].max() == 0:
        return tuple(n // 2 for n in labels.shape)
    parts, n = ndimage.label(labels == int(np.argmax(counts[1:]) + 1))
    largest = int(np.argmax(np.bincount(parts.reshape(-1))[1:]) + 1) if n > 1 else 1
    return tuple(int(round(c)) for c in ndimage.center_of_mass(parts == largest))


def radiological_plane(plane: np.ndarray, affine: np.ndarray, fixed: int) -> tuple[str, np.ndarray, float]:
    """``(view name, plane as shown, row/column aspect)`` of ``plane``, the 2D array left by
    holding voxel axis ``fixed`` of a volume with ``affine`` (the other two axes in voxel order),
    turned and flipped as radiologists read it (``VIEWS``): the preview's orientation, for any
    picture of a slice (``pipeline.figures.weightmap_figure`` draws one)."""
    import nibabel as nib

    ornt = nib.io_orientation(affine)  # voxel axis i -> RAS axis ornt[i, 0], direction ornt[i, 1]
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    axis = {int(ornt[i, 0]): i for i in range(3)}
    name = next(n for n, (held, _, _) in VIEWS.items() if axis[held] == fixed)
    _, down, across = VIEWS[name]
    rest = [i for i in range(3) if i != fixed]  # the plane's axes, in voxel order
    out = np.asarray(plane).transpose(rest.index(axis[down]), rest.index(axis[across]))
    for k, i in enumerate((axis[down], axis[across])):
        if ornt[i, 1] > 0:  # voxel index runs towards +R/+A/+S: flip to run towards -R/-A/-S
            out = np.flip(out, k)
    return name, out, float(zooms[axis[down]] / zooms[axis[across]])


def _views(image: Any, labels: np.ndarray, affine: np.ndarray, at: Sequence[int]) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(name, image plane, label plane, row/column aspect) of each view through voxel ``at``."""
    import nibabel as nib

    ornt = nib.io_orientation(affine)
    out = []
    for fixed_ras in (held for held, _, _ in VIEWS.values()):
        fixed = next(i for i in range(3) if int(ornt[i, 0]) == fixed_ras)
        index: list[Any] = [slice(None)] * 3
        index[fixed] = int(at[fixed])
        name, img, aspect = radiological_plane(np.asarray(image[tuple(index)], dtype=np.float32), affine, fixed)
        out.append((name, img, radiological_plane(labels[tuple(index)], affine, fixed)[1], aspect))
    return out


def crop_to_body(img: np.ndarray, lab: np.ndarray, lo: float, hi: float,
                 pad: float = 0.06) -> tuple[np.ndarray, np.ndarray]:
    """``img`` and ``lab`` (one view's planes) cut to the box around the body and every labelled
    pixel, ``pad`` of the plane's size added on each side: a head in a 500 mm CT field of view is a
    fifth of the picture otherwise. The body is where the image is brighter than a tenth of the
    way from ``lo`` to ``hi`` (the display window: air below a CT's body, the background of an MR
    image). Planes the body fills, or that show nothing, are returned whole."""
    from monai.transforms.utils import generate_spatial_bounding_box

    keep = (img > lo + 0.1 * (hi - lo)) | (lab > 0)
    if not keep.any():
        return img, lab
    start, end = generate_spatial_bounding_box(keep[None], select_fn=lambda x: x, allow_smaller=True,
                                               margin=[int(np.ceil(pad * n)) for n in img.shape])
    box = tuple(slice(a, b) for a, b in zip(start, end, strict=True))
    return img[box], lab[box]


def write_preview(image_file: Path | str, labels: np.ndarray, affine: np.ndarray, label_names: Sequence[str],
                  volumes_ml: Mapping[str, float], out_file: Path | str, title: str = "", unit: str = "mL") -> Path:
    """Draw ``labels`` (X, Y, Z, the grid of ``image_file``, a NIfTI whose first channel is
    shown) over the image in three views through :func:`centre`, with a legend of label names
    and volumes (``volumes_ml[name]``), as a PNG written atomically; ``title`` (the study id) and
    label names as the font can draw them (``drawable``). A 2D image (or one slice) gets one view."""
    import nibabel as nib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    out_file = Path(out_file)
    labels = np.asarray(labels)
    proxy = nib.load(str(image_file)).dataobj
    if len(proxy.shape) > labels.ndim:  # channels last: show the first one
        first = (0,) * (len(proxy.shape) - labels.ndim)
        image = _Channel(proxy, first)
    else:
        image = proxy
    if labels.ndim == 2 or 1 in labels.shape[:3]:
        flat = np.squeeze(labels)
        views = [("", np.asarray(image[...], dtype=np.float32).reshape(flat.shape).T[::-1], flat.T[::-1], 1.0)]
    else:
        views = _views(image, labels, affine, centre(labels))
    pixels = np.concatenate([v[1].reshape(-1) for v in views])
    lo, hi = np.percentile(pixels, [0.5, 99.5]) if pixels.size else (0.0, 1.0)
    if len(views) > 1:  # 3D: each view cut to the body (a 2D image is shown whole)
        views = [(name, *crop_to_body(img, lab, lo, hi), aspect) for name, img, lab, aspect in views]
    colours = label_colours(max(len(label_names), int(labels.max()) + 1))
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*c, 0.5) for c in colours[1:]])
    fig = Figure(figsize=(3.0 * len(views) + 1.8, 3.3), dpi=80)
    FigureCanvasAgg(fig)
    for k, (name, img, lab, aspect) in enumerate(views):
        ax = fig.add_axes((k / (len(views) + 0.6), 0.02, 0.98 / (len(views) + 0.6), 0.82))
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
        ax.imshow(lab, cmap=cmap, vmin=0, vmax=len(colours) - 1, aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [Patch(color=colours[i], label=drawable(f"{n}: {_ml(volumes_ml.get(n, 0.0))} {unit}"))
               for i, n in enumerate(label_names) if i > 0]
    legend = fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    for text in legend.get_texts():
        text.set_parse_math(False)  # a "$" in a name is a character, not TeX
    if title:  # a study id: characters the font lacks escaped (``drawable``), "$" as it is
        fig.suptitle(drawable(title), fontsize=10, x=0.01, ha="left", parse_math=False)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_file) as tmp:
        fig.savefig(tmp, format="png")
    return out_file


def _ml(value: Any) -> str:
    v = float(value or 0.0)
    return f"{v:.1f}" if v >= 1 or v == 0 else f"{v:.3f}"


class _Channel:
    """A view of one channel of a channels-last array proxy, sliced lazily."""

    def __init__(self, proxy: Any, channel: tuple[int, ...]) -> None:
        self.proxy, self.channel = proxy, channel

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        return np.asarray(self.proxy[(*index, *self.channel)])


# ---------------------------------------------------------------- index.html

_SCRIPT = """
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
  const dir = th.dataset.dir === 'asc' ? 'desc' : 'asc';
  for (const h of table.tHead.rows[0].cells) { delete h.dataset.dir; }
  th.dataset.dir = dir;
  const key = r => r.cells[col].dataset.v ?? r.cells[col].textContent;
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
    const c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return dir === 'asc' ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
  history.replaceState(null, '', '#' + col + ':' + dir);
}
window.addEventListener('DOMContentLoaded', () => {
  const m = location.hash.match(/^#(\\d+):(asc|desc)$/);
  const th = m && document.querySelector('thead th:nth-child(' + (+m[1] + 1) + ')');
  if (th) { th.dataset.dir = m[2] === 'asc' ? 'desc' : 'asc'; sortBy(th); }
});
"""

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1em; }
table { border-collapse: collapse; } td, th { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; } th[data-dir=asc]::after { content: ' \\25B2'; }
th[data-dir=desc]::after { content: ' \\25BC'; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fff0f0; } .error { color: #a00; min-width: 18em; max-width: 30em; overflow-wrap: anywhere; }
img { width: 320px; display: block; }
"""


def read_rows(out_dir: Path) -> list[dict[str, str]]:
    """The rows of ``out_dir/report.csv`` (none when it is missing), in study order."""
    f = Path(out_dir) / "report.csv"
    if not f.is_file():
        return []
    with open(f, newline="") as fh:
        return sorted((r for r in csv.DictReader(fh) if r.get("study_id")), key=lambda r: r["study_id"])


def index_html(rows: Sequence[Mapping[str, str]], label_names: Sequence[str], out_dir: Path, running: bool,
               stopped: bool = False) -> str:
    """The page: one row per study (thumbnail, id, status, a volume column per label, seconds,
    the model that made it, error, links to the outputs); images and links relative to
    ``out_dir``. ``running``: it reloads itself; ``stopped``: the batch ended before its last
    study (interrupted, terminated or failed), and the page says how to finish it."""
    e = html.escape
    names = list(label_names)[1:]
    root = Path(out_dir).resolve()
    resolved = functools.lru_cache(maxsize=64)(lambda folder: Path(folder).resolve())  # outputs share folders
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "failed")}
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    from pipeline.postprocess import SIZE_COLUMNS  # mL, or mm² where the studies are 2D images

    prefix, unit = next(((p, u) for p, u in SIZE_COLUMNS.values() if any(r.get(f"{p}_{n}") for r in rows for n in names)),
                        SIZE_COLUMNS[3])
    head = ["preview", "study", "status", *[f"{n} ({unit})" for n in names], "seconds", "model", "files", "error"]
    body = []
    for r in rows:
        link = {k: _href(r.get(k, ""), root, resolved) for k in ("preview", "output", "seg")}
        src = e(link["preview"])
        thumb = f'<a href="{src}"><img src="{src}" alt="{e(r["study_id"])}" loading="lazy"></a>' if src else ""
        files = " ".join(f'<a href="{e(link[k])}">{label}</a>'
                         for k, label in (("output", "NIfTI"), ("seg", "SEG")) if link[k])
        cells = [f'<td data-v="{int(bool(thumb))}">{thumb}</td>', f"<td>{e(r['study_id'])}</td>",
                 f"<td>{e(r.get('status', ''))}</td>"]
        cells += [f'<td class="num">{e(r.get(f"{prefix}_{n}", ""))}</td>' for n in names]
        cells += [f'<td class="num">{e(r.get("seconds", ""))}</td>', f"<td>{e(r.get('model', ''))}</td>",
                  f"<td>{files}</td>",
                  f'<td class="error">{e(r.get("error", ""))}</td>']
        body.append(f'<tr class="{e(r.get("status", ""))}" data-study="{e(r["study_id"])}">{"".join(cells)}</tr>')
    refresh = '<meta http-equiv="refresh" content="15">' if running else ""
    state = ("running, this page reloads every 15 s" if running else
             "stopped before the last study: run the same command again to finish" if stopped else "finished")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">{refresh}<title>segpipe predict: {e(root.name)}</title>'
            f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>\n"
            f"<h1>segpipe predict: {e(str(root))}</h1>\n"
            f'<p id="summary">{len(rows)} stud{"y" if len(rows) == 1 else "ies"}: {counts["ok"]} ok, {counts["skipped"]} skipped, '
            f"{counts['failed']} failed; updated {stamp} ({state}). Click a column to sort.</p>\n"
            "<table><thead><tr>" + "".join(f'<th onclick="sortBy(this)">{e(h)}</th>' for h in head)
            + "</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table></body></html>\n")


def _href(path: str, root: Path, resolve: Callable[[str], Path]) -> str:
    """A link to ``path`` from ``root/index.html`` (``root`` resolved), URL-encoded once: relative
    where it lies under ``root``, else a ``file://`` URI (already encoded: quoting it again broke
    it). ``resolve`` resolves a folder (one cached call per folder, not one per file)."""
    if not path:
        return ""
    p = Path(path)
    try:
        return quote((resolve(str(p.parent)) / p.name).relative_to(root).as_posix())
    except ValueError:
        return p.as_uri() if p.is_absolute() else quote(path)


def write_index(out_dir: Path | str, label_names: Sequence[str], running: bool = False, stopped: bool = False) -> Path:
    """Rewrite ``out_dir/index.html`` from ``report.csv`` atomically, under the report's lock
    (shards writing one folder see each other's rows); ``running``, ``stopped``: ``index_html``."""
    out_dir = Path(out_dir)
    with locked(out_dir / ".report.lock"):
        page = index_html(read_rows(out_dir), label_names, out_dir, running, stopped)
        with atomic_path(out_dir / INDEX) as tmp:
            tmp.write_text(page, encoding="utf-8")
    return out_dir / INDEX
