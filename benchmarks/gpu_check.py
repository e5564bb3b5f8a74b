"""The Python steps of ``benchmarks/gpu_check.sh`` (see there); each writes one JSON file.

- ``infer``: the shipped ``phantom_ct_3d`` weights on a CT-sized mosaic of phantoms with true
  labels (``inference_cases.ct_mosaic_files``), MONAI's ``sliding_window_inference`` (fp32,
  overlap 0.5, Gaussian) against the bundle's inferer in each tiling mode (``amp`` on: bf16 or
  fp16 by ``pipeline.amp``), then the same on a 512x512x300 volume at the network's resolution
  (the mosaic mirrored out to that size: speed and memory, no labels): seconds, Mvox/s, Dice,
  peak GPU memory;
- ``oom``: the out-of-memory fallback: with ``torch.cuda.set_per_process_memory_fraction`` too
  small for the stitched 512x512x300 output, the predictor must stitch on the CPU instead and give
  the same argmax as unconstrained;
- ``nccl``: run under ``torchrun --nproc_per_node 1``: a process group on nccl, an all-reduce;
- ``train``: summarise ``segpipe train`` runs from their ``metrics.jsonl`` (loss per epoch);
- ``table``: one markdown table from the JSON files, printed and written to a file.

``--device cpu --tiny`` runs the same code on the CPU with tiny sizes (``gpu_check.sh --cpu-smoke``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_cases import ROOT, bundle_network, dice_per_class, load_cases  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402

from pipeline.bundle import get, load_bundle  # noqa: E402
from pipeline.inference import mirror_pad, predict_tiles  # noqa: E402

BUNDLE = "phantom_ct_3d"
TILINGS = {"blend": {"tiling": "blend"}, "overlap-tile": {"tiling": "overlap-tile"}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _methods(net: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    parser = load_bundle(ROOT / "bundles" / BUNDLE, ("common.json", "inference.json"), {})
    roi = tuple(parser.get_parsed_content("roi_size"))
    bs = int(parser.get_parsed_content("sw_batch_size"))
    monai_net = copy.deepcopy(net).to(device)

    def monai(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return sliding_window_inference(x, roi, bs, monai_net, overlap=0.5, mode="gaussian")

    methods: dict[str, Any] = {"monai fp32": monai}
    for name, over in TILINGS.items():
        inferer = get(load_bundle(ROOT / "bundles" / BUNDLE, ("common.json", "inference.json"), over), "inferer")
        methods[f"{name} amp"] = (lambda inf, n: (lambda x: inf(x, n)))(inferer, copy.deepcopy(net).to(device))
    return methods


def run_infer(device: torch.device, tiny: bool, repeats: int, partial: Path | None = None) -> dict[str, Any]:
    """Every method on the mosaic, then on the big volume; the rows so far are written to ``partial``
    after each one, so a step stopped by its time limit still leaves them for the table."""
    net, parser = bundle_network(BUNDLE)
    n_classes = int(parser.get_parsed_content("out_channels"))
    (_, x, y), = load_cases("ct-mosaic", parser, grid=(1, 1, 1) if tiny else (4, 4, 8))
    big_shape = (64, 64, 40) if tiny else (512, 512, 300)
    pads = [(0, max(0, b - n)) for b, n in zip(big_shape, x.shape[2:], strict=True)]
    big = mirror_pad(x, pads)[(slice(None), slice(None), *(slice(0, b) for b in big_shape))].contiguous()
    methods = _methods(net, device)
    rows: dict[str, Any] = {}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for vol_name, vol, label in (("mosaic", x, y), ("512x512x300" if not tiny else "tiny", big, None)):
        vol = vol.to(device)
        for k, fn in methods.items():
            fn(vol[..., :48, :48, :32])  # warm-up (cuDNN, oneDNN)
            times = []
            _peak_reset(device)
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                out = fn(vol)
                _sync(device)
                times.append(time.perf_counter() - t0)
            row = {"volume": vol_name, "shape": list(vol.shape[2:]), "seconds": min(times),
                   "mvox_s": vol[0, 0].numel() / min(times) / 1e6, "peak_mib": _peak_mib(device),
                   "out_device": str(out.device)}
            if label is not None:
                d = dice_per_class(out.argmax(1)[0].cpu(), label, n_classes)
                row.update(dice=sum(d) / len(d), dice_per_class=d)
            rows[f"{vol_name}: {k}"] = row
            if partial is not None:
                partial.write_text(json.dumps({"device": str(device), "gpu": gpu, "rows": rows}, indent=1))
            del out
            print(f"{vol_name:>12} {k:<18} {row['seconds']:7.2f} s {row['mvox_s']:8.2f} Mvox/s "
                  f"peak {row['peak_mib'] or 0:9.0f} MiB  Dice {row.get('dice', float('nan')):.4f}", flush=True)
    return {"device": str(device), "gpu": gpu, "rows": rows}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_oom(device: torch.device, tiny: bool, partial: Path | None = None) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "the out-of-memory fallback needs CUDA"}
    net, parser = bundle_network(BUNDLE)
    net = net.to(device)
    roi = tuple(parser.get_parsed_content("roi_size"))
    # a CT-sized volume: its stitched output (1.2 GiB) is far above what the windows need, so a cap can
    # sit between the two
    shape = (64, 64, 40) if tiny else (512, 512, 300)
    x = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    result: dict[str, Any] = {"shape": list(shape)}
    for tiling in ("blend", "overlap-tile"):
        ref = predict_tiles(net, x, roi, margin=0, tiling=tiling, amp=True, stitch_device="cpu")
        out_bytes = ref.numel() * 4
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        # the input, its mirror-padded copy and the windows fit; the stitched output does not
        allowed = torch.cuda.memory_allocated(device) + int(1.3 * x.numel() * 4) + out_bytes // 2
        torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), device)
        handler = _Records()
        logging.getLogger("pipeline.inference").addHandler(handler)
        t0 = time.perf_counter()
        try:
            out = predict_tiles(net, x, roi, margin=0, tiling=tiling, amp=True)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            logging.getLogger("pipeline.inference").removeHandler(handler)
        fell_back = any("stitching on the CPU instead" in m for m in handler.messages)
        agree = float((out.argmax(1).cpu() == ref.argmax(1)).float().mean())
        result[tiling] = {"fell_back_to_cpu": fell_back, "out_device": str(out.device), "argmax_agreement": agree,
                          "output_mib": out_bytes / 2**20, "allowed_mib": allowed / 2**20,
                          "seconds_capped": round(time.perf_counter() - t0, 2)}
        print(f"oom {tiling}: fell back {fell_back}, output on {out.device}, agreement {agree:.6f}", flush=True)
        if partial is not None:  # kept if the step's time limit stops the next tiling
            partial.write_text(json.dumps(result, indent=1))
    return result


def run_nccl() -> dict[str, Any]:
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
        t = torch.ones(4, device=dev) * (dist.get_rank() + 1)
        dist.all_reduce(t)
        ok = bool(torch.all(t == sum(range(1, dist.get_world_size() + 1))))
        return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "all_reduce_ok": ok}
    finally:
        dist.destroy_process_group()


def run_train_summary(dirs: list[Path]) -> dict[str, Any]:
    out = {}
    for d in dirs:
        losses, dtype, wall = [], None, None
        journal = d / "metrics.jsonl"
        for line in journal.read_text().splitlines() if journal.is_file() else []:
            r = json.loads(line)
            if r.get("key") == "train_loss_epoch":
                losses.append(r["value"])
            elif r.get("key") == "amp_dtype":
                dtype = r["value"]
        if (d / "wall_s").is_file():
            wall = float((d / "wall_s").read_text())
        out[d.name] = {"losses": losses, "amp_dtype": dtype, "falling": len(losses) > 1 and losses[-1] < losses[0],
                       "wall_s": wall}
    return out


def table(results: Path) -> str:
    lines = [f"# gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    load = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    if "infer" in load:
        lines += [f"Inference on {load['infer']['gpu']} ({load['infer']['device']}):", "",
                  "| volume | method | s | Mvox/s | vs MONAI | Dice | peak GPU MiB |", "|---|---|---:|---:|---:|---:|---:|"]
        rows = load["infer"]["rows"]
        for k, r in rows.items():
            base = rows[f"{r['volume']}: monai fp32"]["seconds"]
            dice = f"{r['dice']:.4f}" if "dice" in r else "-"
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
            lines.append(f"| {r['volume']} {tuple(r['shape'])} | {k.split(': ', 1)[1]} | {r['seconds']:.2f} | "
                         f"{r['mvox_s']:.2f} | {base / r['seconds']:.2f}x | {dice} | {peak} |")
        lines.append("")
    if "train" in load:
        lines += ["Training (segpipe train, phantom bundle):", "", "| run | amp_dtype | loss per epoch | falling |",
                  "|---|---|---|---|"]
        for k, r in load["train"].items():
            lines.append(f"| {k} | {r['amp_dtype']} | {', '.join(f'{v:.3f}' for v in r['losses'])} | {r['falling']} |")
        lines.append("")
    for key in ("oom", "nccl"):
        if key in load:
            lines.append(f"{key}: {json.dumps(load[key])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["infer", "oom", "nccl", "train", "table"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU smoke run)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", type=Path, required=True, help="folder of the steps' JSON files")
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="train: segpipe train output folders")
    ap.add_argument("--out", type=Path, default=None, help="table: also write it here")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a.results.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    if a.step == "table":
        text = table(a.results)
        print(text)
        if a.out:
            a.out.write_text(text)
        return
    if a.step == "nccl":
        result = run_nccl()
        if int(os.environ.get("RANK", 0)) != 0:
            return
    elif a.step == "infer":
        result = run_infer(device, a.tiny, a.repeats, partial=a.results / "infer.json")
    elif a.step == "oom":
        result = run_oom(device, a.tiny, partial=a.results / "oom.json")
    else:
        result = run_train_summary(a.runs)
    (a.results / f"{a.step}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
