"""Markdown tables of a cross-validation (``crossval.json`` from ``segpipe crossval``), optionally beside
a plain MONAI baseline scored on the same cases (``metrics.json`` from ``benchmarks/monai_baseline.py``),
for BENCHMARKS.md and a bundle's docs: nothing is measured here, the files are read and printed.

    .venv/bin/python benchmarks/crossval_report.py bundles/headneck_ct_oar/runs_cv/crossval.json \\
        --baseline runs/baseline_hn30/fold_0/metrics.json
    .venv/bin/python benchmarks/crossval_report.py bundles/headneck_ct_oar/runs_cv_242/crossval.json \\
        --against bundles/headneck_ct_oar/runs_cv_long/crossval.json

Tables: per fold (cases, Dice per class, mean; the chosen post-processing's mean); per class over
all scored cases, Dice and HD95 (mm) without and with the chosen post-processing; with
``--baseline``, the baseline's folds against ours on exactly the baseline's cases; with ``--against``,
another cross-validation of the same split, paired case by case (mean difference, its standard
error, cases better) per fold, on the cases both scored, with each one's chosen post-processing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _f(x: float, digits: int = 4) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def fold_table(cv: dict) -> list[str]:
    classes = list(cv["summary"]["dice"])
    pp = cv["postprocessing"]
    chosen = pp.get("per_fold", {})
    head = ["fold", "cases", *classes, "mean Dice", f"mean, {pp['chosen']}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for k, f in cv["per_fold"].items():
        if not f["n"]:
            continue
        c = chosen.get(k, {}).get("mean_dice", float("nan"))
        lines.append(f"| {k} | {f['n']} | " + " | ".join(_f(f["dice"][n]["mean"]) for n in classes)
                     + f" | {_f(f['mean_dice'])} | {_f(c)} |")
    s, c = cv["summary"], pp.get("summary", {}).get("mean_dice", float("nan"))
    lines.append(f"| **all (out-of-fold)** | {cv['cases_scored']} | "
                 + " | ".join(_f(s["dice"][n]["mean"]) for n in classes) + f" | **{_f(s['mean_dice'])}** | **{_f(c)}** |")
    return lines


def class_table(cv: dict) -> list[str]:
    pp = cv["postprocessing"]
    s, c = cv["summary"], pp.get("summary")
    lines = [f"| class | Dice | HD95 (mm) | Dice, {pp['chosen']} | HD95 (mm), {pp['chosen']} |",
             "|---|---:|---:|---:|---:|"]
    for n in s["dice"]:
        d, h = s["dice"][n], s["hd95_mm"][n]
        row = f"| {n} | {_f(d['mean'])} +- {_f(d['sd'], 3)} | {_f(h['mean'], 1)} |"
        row += (f" {_f(c['dice'][n]['mean'])} +- {_f(c['dice'][n]['sd'], 3)} | {_f(c['hd95_mm'][n]['mean'], 1)} |"
                if c else " - | - |")
        lines.append(row)
    lines.append(f"| **mean** | **{_f(s['mean_dice'])}** | | **{_f(c['mean_dice']) if c else '-'}** | |")
    return lines


def baseline_table(cv: dict, baseline: dict) -> list[str]:
    """Ours out-of-fold (without and with the chosen post-processing) against the baseline, per
    class, on exactly the baseline's cases."""
    ids = sorted(baseline["per_case"])
    missing = [i for i in ids if i not in cv["cases"]]
    if missing:
        raise SystemExit(f"the baseline scored {missing[0]}, which crossval.json has not (another split?)")
    classes = list(cv["summary"]["dice"])
    pp = cv["postprocessing"]
    runs = {"MONAI baseline": baseline["per_case"],
            "ours": {i: {n: {"dice": c["dice"][n], "hd95_mm": c["hd95_mm"][n]} for n in classes}
                     for i, c in cv["cases"].items()}}
    if "cases" in pp:
        runs[f"ours, {pp['chosen']}"] = {i: {n: {"dice": c["dice"][n], "hd95_mm": c["hd95_mm"][n]} for n in classes}
                                         for i, c in pp["cases"].items()}
    lines = ["| class | " + " | ".join(f"{r}: Dice (HD95 mm)" for r in runs) + " |", "|---|" + "---:|" * len(runs)]
    means: dict[str, list[float]] = {r: [] for r in runs}
    for n in classes:
        cells = []
        for r, per_case in runs.items():
            d = [per_case[i][n]["dice"] for i in ids]
            h = np.array([per_case[i][n]["hd95_mm"] for i in ids], dtype=float)
            means[r].append(float(np.mean(d)))
            cells.append(f"{_f(np.mean(d))} ({_f(np.nanmean(h) if np.isfinite(h).any() else np.nan, 1)})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append(f"| **mean** ({len(ids)} cases) | " + " | ".join(f"**{_f(np.mean(v))}**" for v in means.values()) + " |")
    return lines


def _case_means(cv: dict) -> dict[str, float]:
    """Mean Dice over classes per case, with the chosen post-processing where there is one."""
    cases = cv["postprocessing"].get("cases") or cv["cases"]
    return {i: float(np.mean(list(c["dice"].values()))) for i, c in cases.items()}


def paired_table(cv: dict, other: dict) -> list[str]:
    """``cv`` against ``other`` (the same split), paired per case, per fold and over all common cases."""
    a, b = _case_means(cv), _case_means(other)
    common = sorted(set(a) & set(b))
    if not common:
        raise SystemExit("the two cross-validations have no scored case in common")
    moved = [i for i in common if cv["cases"][i]["fold"] != other["cases"][i]["fold"]]
    if moved:
        raise SystemExit(f"{moved[0]} is in different folds of the two cross-validations (another split?)")
    pa, pb = cv["postprocessing"]["chosen"], other["postprocessing"]["chosen"]
    lines = [f"| fold | cases | other ({pb}) | this ({pa}) | paired difference +- se | cases better |",
             "|---|---:|---:|---:|---:|---:|"]
    folds = sorted({cv["cases"][i]["fold"] for i in common})
    for k in [*folds, None]:
        ids = [i for i in common if k is None or cv["cases"][i]["fold"] == k]
        d = np.array([a[i] - b[i] for i in ids])
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        name = "**all**" if k is None else str(k)
        lines.append(f"| {name} | {len(ids)} | {_f(np.mean([b[i] for i in ids]))} | {_f(np.mean([a[i] for i in ids]))} "
                     f"| {d.mean():+.4f} +- {_f(se)} | {int((d > 0).sum())} / {len(d)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("crossval", type=Path, help="crossval.json")
    ap.add_argument("--baseline", type=Path, action="append", default=[], help="monai_baseline.py metrics.json")
    ap.add_argument("--against", type=Path, help="another crossval.json of the same split, compared case by case")
    a = ap.parse_args()
    cv = json.loads(a.crossval.read_text())
    print(f"{cv['cases_scored']} of {cv['cases_total']} cases scored ({cv['bundle']}, {cv['folds']} folds)\n")
    print("\n".join(fold_table(cv)) + "\n")
    print("\n".join(class_table(cv)) + "\n")
    pp = cv["postprocessing"]
    print("post-processing on the out-of-fold masks (mean Dice): "
          + ", ".join(f"{k} {_f(v)}" for k, v in pp["mean_dice"].items()) + f"; chosen: {pp['chosen']}\n")
    for f in a.baseline:
        b = json.loads(f.read_text())
        print(f"MONAI baseline fold {b['fold']}: {b['epochs']} epochs, {b['samples']} samples in {b['train_s']} s "
              f"({b.get('samples_per_s', '-')} samples/s, {b['threads']} threads), lr {b.get('lr', '-')}\n")
        print("\n".join(baseline_table(cv, b)) + "\n")
    if a.against:
        print(f"paired against {a.against}:\n")
        print("\n".join(paired_table(cv, json.loads(a.against.read_text()))) + "\n")


if __name__ == "__main__":
    main()
