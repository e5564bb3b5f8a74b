"""How far a voxel's prediction changes with its distance from the window's face: the evidence
for the overlap-tile margin of each shipped network.

For one spatial axis at a time, the volume is cut into non-overlapping windows of the training
patch (``roi_size``), and the cut is repeated with the windows moved by 0, s, 2s, ... voxels along
that axis (s = ``--step``), so every voxel is predicted at every distance d = 0, 1, ... from a
window face along that axis (with step s, every s-th). Its *reference* is the pass in which it is
nearest the window's centre along that axis. For each d the script reports, over all voxels
predicted at distance d:

- ``flips/1k fg``: voxels whose argmax differs from the reference, per 1000 reference-foreground
  voxels (what moves Dice);
- ``TV``: mean total-variation distance of the softmax from the reference's (x 1000).

Two effects add up. Near the face, the missing context (the convolutions' zero padding inside
the window) changes predictions steeply. Further in, the curve falls slowly and about linearly to
0 at the centre: instance normalisation takes its statistics over the window, so a window moved
by k voxels holds other content and predicts every voxel a little differently, however far from
its faces (blending averages over the same variation). No margin removes the second effect, so the
*edge excess* is the curve minus a straight line fitted to its inner half (d >= roi/4), and the
margin is the smallest d whose edge excess is below ``--tolerance`` flips per 1000 foreground
voxels. Windows run with the bundle's precision policy (``pipeline.amp``; ``--no-amp``: fp32).
Context beyond the volume is mirror padding.

    .venv/bin/python benchmarks/margin_profile.py --bundle phantom_ct_3d --cases ct-mosaic --grid 2 2 2
    .venv/bin/python benchmarks/margin_profile.py --bundle hippocampus_mri_3d --cases hippocampus --n 6
    .venv/bin/python benchmarks/margin_profile.py --bundle cells_2d --cases cells-mosaic --grid 4 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import time

import torch
from inference_cases import add_threads_option, bundle_network, load_cases, set_threads

from pipeline.amp import autocast, autocast_dtype
from pipeline.inference import mirror_pad

log = logging.getLogger("margin_profile")


def probabilities(net: torch.nn.Module, windows: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    with torch.inference_mode(), autocast("cpu", dtype):
        y = net(windows)
    y = y[0] if isinstance(y, (list, tuple)) else y
    return torch.softmax(y.float(), dim=1)


def shifted_pass(net: torch.nn.Module, x: torch.Tensor, roi: tuple[int, ...], axis: int, shift: int,
                 batch: int, dtype: torch.dtype | None) -> torch.Tensor:
    """Softmax (K, *spatial) of ``x`` (1, C, *spatial) from non-overlapping ``roi`` windows whose
    grid along ``axis`` starts at ``shift - roi[axis]`` (other axes: at 0); mirror context."""
    shape = x.shape[2:]
    starts = []
    for a, (n, r) in enumerate(zip(shape, roi, strict=True)):
        first = shift - r if a == axis else 0
        starts.append(list(range(first, n, r)))
    pads = [(max(0, -s[0]), max(0, s[-1] + r - n)) for s, n, r in zip(starts, shape, roi, strict=True)]
    padded = mirror_pad(x, pads)
    boxes = list(itertools.product(*starts))
    out = None
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        w = torch.cat([padded[(slice(None), slice(None),
                               *(slice(s + p[0], s + p[0] + r) for s, p, r in zip(b, pads, roi, strict=True)))]
                       for b in chunk])
        p = probabilities(net, w, dtype)
        if out is None:
            out = torch.empty((p.shape[1], *shape), dtype=torch.float16)
        for j, b in enumerate(chunk):
            dst = tuple(slice(max(s, 0), min(s + r, n)) for s, r, n in zip(b, roi, shape, strict=True))
            src = tuple(slice(d.start - s, d.stop - s) for d, s in zip(dst, b, strict=True))
            out[(slice(None), *dst)] = p[(j, slice(None), *src)].half()
    assert out is not None
    return out


def profile_axis(net: torch.nn.Module, x: torch.Tensor, roi: tuple[int, ...], axis: int, step: int,
                 batch: int, dtype: torch.dtype | None) -> dict[int, list[float]]:
    """{distance: [flips, reference fg voxels, TV sum, voxels]} along ``axis`` for one case."""
    r, n = roi[axis], x.shape[2 + axis]
    shifts = list(range(0, r, step))
    passes = [shifted_pass(net, x, roi, axis, t, batch, dtype) for t in shifts]
    pos = torch.arange(n)
    # index in the window along the axis in pass k: (p - (t - r)) mod r; distance to the nearer face
    index = torch.stack([(pos - t + r) % r for t in shifts])
    dist = torch.minimum(index, r - 1 - index)
    ref_k = dist.argmax(dim=0)  # per position along the axis: the most central pass
    stack = torch.stack(passes)  # (P, K, *spatial)
    ref = torch.stack([stack[(int(ref_k[p]), slice(None), *([slice(None)] * axis), p)] for p in range(n)],
                      dim=1 + axis)
    ref_arg = ref.argmax(0)
    stats: dict[int, list[float]] = {}
    for k in range(len(shifts)):
        arg = stack[k].argmax(0)
        tv = 0.5 * (stack[k].float() - ref.float()).abs().sum(0)
        for d in dist[k].unique().tolist():
            sel = (dist[k] == d) & (ref_k != k)
            if not sel.any():
                continue
            idx = sel.nonzero().flatten()
            a, ra, t = arg.index_select(axis, idx), ref_arg.index_select(axis, idx), tv.index_select(axis, idx)
            s = stats.setdefault(int(d), [0.0, 0.0, 0.0, 0.0])
            s[0] += float((a != ra).sum())
            s[1] += float((ra > 0).sum())
            s[2] += float(t.sum())
            s[3] += float(t.numel())
    return stats


def edge_excess(flips: dict[int, float], roi: int) -> dict[int, float]:
    """``flips`` (per distance) minus a least-squares line through its points with d >= roi / 4."""
    inner = [(d, f) for d, f in flips.items() if d >= roi / 4]
    if len(inner) < 2:
        return dict(flips)
    n = len(inner)
    mx, my = sum(d for d, _ in inner) / n, sum(f for _, f in inner) / n
    var = sum((d - mx) ** 2 for d, _ in inner)
    slope = sum((d - mx) * (f - my) for d, f in inner) / var if var else 0.0
    return {d: f - (my + slope * (d - mx)) for d, f in flips.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="phantom_ct_3d")
    ap.add_argument("--cases", default="ct-mosaic", help="ct-mosaic, ct-cohort, hippocampus, cells-mosaic")
    ap.add_argument("--n", type=int, default=None, help="number of cases (hippocampus, ct-cohort)")
    ap.add_argument("--grid", type=int, nargs="+", default=None, help="mosaic grid (phantoms or images per axis)")
    ap.add_argument("--step", type=int, default=2, help="shift between passes (voxels)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tolerance", type=float, default=0.5, help="edge excess (flips per 1000 fg) for the margin")
    ap.add_argument("--json", default=None, help="also write the profile to this file")
    add_threads_option(ap)
    a = ap.parse_args()
    set_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    net, parser = bundle_network(a.bundle)
    roi = tuple(int(r) for r in parser.get_parsed_content("roi_size"))
    dtype = autocast_dtype("cpu", a.amp)
    cases = load_cases(a.cases, parser, n=a.n, grid=a.grid)
    t0 = time.perf_counter()
    result: dict[str, dict[int, list[float]]] = {}
    for axis in range(len(roi)):
        total: dict[int, list[float]] = {}
        for name, x, _ in cases:
            for d, s in profile_axis(net, x, roi, axis, a.step, a.batch, dtype).items():
                acc = total.setdefault(d, [0.0] * 4)
                for i in range(4):
                    acc[i] += s[i]
            log.info("axis %d %s done (%.0f s)", axis, name, time.perf_counter() - t0)
        result[str(axis)] = dict(sorted(total.items()))
    print(f"\n{a.bundle} on {a.cases} ({len(cases)} case(s), shapes {[tuple(c[1].shape[2:]) for c in cases][:3]}...), "
          f"roi {roi}, step {a.step}, precision {dtype or 'fp32'}, load {os.getloadavg()[0]:.1f}, "
          f"{time.perf_counter() - t0:.0f} s")
    margins = []
    for axis, stats in result.items():
        flips = {d: 1000 * f / max(fg, 1) for d, (f, fg, _, _) in stats.items()}
        excess = edge_excess(flips, roi[int(axis)])
        margin = next((d for d in sorted(excess) if excess[d] < a.tolerance), max(excess))
        margins.append(margin)
        print(f"axis {axis} (roi {roi[int(axis)]}): margin {margin}; d, flips/1k fg, edge excess, TV x1000")
        for d, (_, _, tv, nvox) in stats.items():
            print(f"  {d:3d} {flips[d]:8.2f} {excess[d]:8.2f} {1000 * tv / max(nvox, 1):8.3f}")
    print(f"margin per axis (edge excess < {a.tolerance} flips/1k fg): {margins}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bundle": a.bundle, "cases": a.cases, "roi": roi, "step": a.step,
                       "profile": {ax: {d: v for d, v in st.items()} for ax, st in result.items()}}, f)


if __name__ == "__main__":
    main()
