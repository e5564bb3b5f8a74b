import subprocess
import sys

from pipeline.cli import _parse_set, build_parser, main


def test_help_for_every_subcommand():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"synth", "validate", "fingerprint", "train", "predict", "evaluate", "demo", "ui"} <= set(sub.choices)
    for name in sub.choices:
        r = subprocess.run([sys.executable, "-m", "pipeline", name, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
        assert "usage:" in r.stdout


def test_usage_error_exit_2():
    r = subprocess.run([sys.executable, "-m", "pipeline", "nonsense"], capture_output=True, text=True)
    assert r.returncode == 2


def test_set_parsing():
    assert _parse_set(["a=1", "b=[1,2]", "c=text", "d#e=true"]) == {"a": 1, "b": [1, 2], "c": "text", "d#e": True}
    assert main(["train", "x", "--set", "novalue"]) == 2


def test_cuda_device_without_gpu_is_usage_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    for cmd in (["train", "bundles/phantom_ct_3d", "--device", "cuda"],
                ["predict", "bundles/phantom_ct_3d", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--device", "cuda:0"]):
        r = subprocess.run([sys.executable, "-m", "pipeline", *cmd], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert "no CUDA GPU" in r.stderr and len(r.stderr.strip().splitlines()) == 1
