"""``pipeline.cpu_memory.keep_freed_memory``: a CPU forward pass stops page-faulting its activations in.

Each case runs in a fresh interpreter (malloc settings are per process): a small 3D network's forward
pass, warmed up, then the minor page faults of each of seven more, with and without the setting. The
median pass is compared: without the setting every pass faults its activations in again; with it a
pass now and then still grows the heap once by one activation (seen on CI: 3 of 5 passes' worth in a
mean), which is not the recurring cost the setting removes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = """
import json, resource, statistics, sys, torch
from torch import nn
kept = None
if sys.argv[1] == "keep":
    from pipeline.cpu_memory import keep_freed_memory
    kept = keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
net = nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), nn.InstanceNorm3d(16), nn.ReLU(),
                    nn.Conv3d(16, 16, 3, padding=1), nn.InstanceNorm3d(16), nn.ReLU(), nn.Conv3d(16, 2, 1)).eval()
x = torch.rand(2, 1, 64, 64, 48)  # 16-channel activations of 24 MiB: far above glibc's default mmap threshold
with torch.inference_mode():
    for _ in range(3):
        net(x)
    faults = []
    for _ in range(7):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": statistics.median(faults), "each": faults}))
"""


def _faults(mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CODE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux); elsewhere it is a no-op")
def test_a_forward_pass_reuses_freed_activations_instead_of_faulting_them_in() -> None:
    default, kept = _faults("default"), _faults("keep")
    if default["faults"] < 1000:
        pytest.skip(f"this C library reuses freed blocks already ({default['faults']:.0f} faults in the median forward pass)")
    assert kept["kept"] is True
    assert kept["faults"] < default["faults"] / 20, (kept, default)
