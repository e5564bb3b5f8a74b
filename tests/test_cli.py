import subprocess
import sys

from pipeline.cli import build_parser, main
from pipeline.cli_commands import parse_set


def test_help_for_every_subcommand():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"synth", "validate", "fingerprint", "train", "predict", "evaluate", "demo", "ui"} <= set(sub.choices)
    for name in sub.choices:
        r = subprocess.run([sys.executable, "-m", "pipeline", name, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
        assert "usage:" in r.stdout


def test_every_option_says_what_it_does_and_the_top_help_is_for_users():
    """--device, --tracking-uri, --epochs, --amp, --no-progress had no help line, and `segpipe
    --help` described the module to developers ("parse arguments, call one function, ...")."""
    import argparse

    parser = build_parser()
    assert "segmentation" in parser.description and "Exit codes" in parser.epilog
    sub = next(a for a in parser._actions if a.dest == "command")
    silent = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
              if not a.help and not isinstance(a, argparse._HelpAction)]
    assert silent == []


def test_usage_error_exit_2():
    r = subprocess.run([sys.executable, "-m", "pipeline", "nonsense"], capture_output=True, text=True)
    assert r.returncode == 2


def test_set_parsing():
    assert parse_set(["a=1", "b=[1,2]", "c=text", "d#e=true"]) == {"a": 1, "b": [1, 2], "c": "text", "d#e": True}
    assert main(["train", "x", "--set", "novalue"]) == 2


def test_a_set_value_of_the_wrong_kind_is_refused_before_anything_runs(tmp_path, capsys):
    """`--set roi_size=[32,32` became the string "[32,32": training deleted the last run's checkpoints,
    then failed on a TypeError naming nothing; `--set tta=False` was the string "False", which is truthy,
    so TTA stayed on without a word."""
    from pathlib import Path

    import pytest

    from pipeline.bundle import load_bundle
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match=r"--set roi_size=\[32,32: not valid JSON"):
        parse_set(["roi_size=[32,32"])
    bundle = Path(__file__).resolve().parents[1] / "bundles" / "phantom_ct_3d"
    configs = ("common.json", "inference.json")
    for key, value, says in (("tta", "False", "expects true or false"), ("tta", "fasle", "expects true or false"),
                             ("roi_size", "32x32", "expects a list"), ("overlap", "0.5x", "expects a number")):
        with pytest.raises(UsageError, match=f"--set {key}={value}: {says}"):
            load_bundle(bundle, configs, {key: value})
    for ok in ({"margin": "auto"}, {"save_probabilities": "float32"}, {"tta": "$@tta"}, {"tta": False}):
        load_bundle(bundle, configs, ok)  # words a setting takes, expressions, and the JSON itself
    assert main(["train", str(bundle), "--manifest", str(tmp_path / "dataset.json"), "--set", "tta=False"]) == 2
    assert "--set tta=False: expects true or false" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_cuda_device_without_gpu_is_usage_error(tmp_path, monkeypatch, capsys):
    """On any machine: with CUDA reported absent, asking for it is a usage error in one line."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in (["train", "bundles/phantom_ct_3d", "--device", "cuda"],
                ["predict", "bundles/phantom_ct_3d", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--device", "cuda:0"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "no CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_exit_code_of_the_process_is_mains():
    """``python -m pipeline`` exits with what ``main`` returns (the in-process tests rely on it)."""
    r = subprocess.run([sys.executable, "-m", "pipeline", "train", "x", "--set", "novalue"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--set expects key=value" in r.stderr and "Traceback" not in r.stderr


def test_an_unexpected_error_is_one_line(monkeypatch, capsys):
    """The last-resort handler: a library's many-line message is cut to its first line, exit 1."""
    import pipeline.cli

    def broken(a):
        raise ValueError("first line of a library's message\nsecond line\nthird line")

    monkeypatch.setattr(pipeline.cli, "cmd_validate", broken)
    assert main(["validate", "some.json"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "first line" in err and "second" not in err


def test_a_setting_of_the_wrong_type_is_a_usage_error_naming_it(capsys):
    assert main(["train", "bundles/phantom_ct_3d", "--set", "max_epochs=ten"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "setting 'max_epochs': expected an integer, got 'ten'" in err


def _no_mlflow_server(monkeypatch):
    """A regression must fail here, not turn the test process into the UI server."""
    from mlflow.cli import server

    def refuse(*a, **k):
        raise AssertionError("MLflow's server was started")

    monkeypatch.setattr(server, "main", refuse)


def test_ui_port_and_host_errors_are_one_usage_line_naming_the_option(tmp_path, monkeypatch, capsys):
    """--port 70000 was an OverflowError (exit 1), an unusable --host a complaint about the port."""
    import socket

    _no_mlflow_server(monkeypatch)
    store = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    (tmp_path / "mlflow.db").touch()  # only its existence is checked before these
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    for args, said, not_said in ((["--port", "70000"], "--port 70000: not a port number (1-65535)", "Overflow"),
                                 (["--port", "0"], "--port 0: not a port number", "--host"),
                                 (["--host", "192.0.2.1", "--port", port], "--host 192.0.2.1: not an address of this machine",
                                  "--port"),
                                 (["--allowed-hosts", " , ", "--port", port], "--allowed-hosts: no host given", "Traceback"),
                                 (["--host", "no-such-host.invalid", "--port", port], "--host no-such-host.invalid: not a name",
                                  "--port")):  # last: with a resolver that knows no name
        if "no-such-host.invalid" in args:  # no resolver round trip in a test
            def unknown(*a, **k):
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

            monkeypatch.setattr(socket, "getaddrinfo", unknown)
        assert main(["ui", *args, *store]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and said in err and not_said not in err, err
    r = subprocess.run([sys.executable, "-m", "pipeline", "ui", "--port", "70000", *store], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--port 70000" in r.stderr


def test_ui_on_a_missing_store_is_one_line_and_creates_nothing(tmp_path, monkeypatch, capsys):
    _no_mlflow_server(monkeypatch)
    assert main(["ui", "--tracking-uri", f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no MLflow store at" in err and "--tracking-uri" in err
    assert not (tmp_path / "none").exists()


def test_a_second_demo_evaluates_the_model_it_trained(tmp_path, monkeypatch):
    """``segpipe demo`` twice into one folder: the second model's masks replace the first one's
    (before, every study was skipped and the first model's Dice was reported as the second's),
    the counts say what was predicted and what kept, and the UI hint runs from any folder.
    Training is replaced by weights written at once (random, then every voxel kidney) and the
    phantoms are small; prediction and evaluation are the demo's own."""
    import json
    import math
    import shlex
    from pathlib import Path

    import torch

    import pipeline.demo as demo
    import pipeline.synthetic
    import pipeline.train
    from pipeline.bundle import get, load_bundle

    real_write = pipeline.synthetic.write_dataset
    monkeypatch.setattr(pipeline.synthetic, "write_dataset",
                        lambda kind, n, out, seed=0, **kw: real_write(kind, n, out, seed=seed, shape=(24, 24, 8)))
    monkeypatch.setattr(demo, "N_TRAIN", 2)
    torch.manual_seed(0)
    state = get(load_bundle(demo.BUNDLE, ("common.json", "inference.json")), "network_def").state_dict()
    trained = []

    def train(bundle, manifest, epochs=None, overrides=None, **kw):
        out = Path(overrides["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.clone() for k, v in state.items()}
        if epochs == 2:  # the "better" model: the output bias makes every voxel kidney
            key = [k for k, v in weights.items() if k.endswith("bias") and v.shape == (4,)][-1]
            weights[key][2] += 1e4
        torch.save(weights, out / "model.pt")
        trained.append(epochs)
        return {"model_path": str(out / "model.pt"), "best_val_mean_dice": 0.5, "wall_s": 1.0,
                "mlflow_run_id": None, "tracking_uri": f"sqlite:///{tmp_path / 'demo.db'}"}

    monkeypatch.setattr(pipeline.train, "train_bundle", train)
    out = tmp_path / "demo"
    said = []

    def dice(lines):
        return float(next(line for line in lines if line.strip().startswith("mean")).split()[1])

    for epochs in (1, 2, 2):
        said.append([])
        assert demo.run_demo(out, epochs=epochs, echo=said[-1].append) == 0
    assert trained == [1, 2, 2]
    assert any(line.startswith("[4/5] predicted 4 held-out studies") and "kept" not in line for line in said[1])
    assert not math.isnan(dice(said[0])) and dice(said[1]) != dice(said[0])  # the second model's, not the first's
    summary = json.loads((out / "demo_summary.json").read_text())
    assert f"{summary['evaluation']['mean_dice']:.3f}" == f"{dice(said[1]):.3f}"
    assert any(line.startswith("[4/5] predicted 0 held-out studies") and "(4 more kept" in line for line in said[2])
    assert dice(said[2]) == dice(said[1])
    hint = next(line for line in said[0] if "open the MLflow UI" in line).split(":", 1)[1]
    command = shlex.split(hint)
    assert Path(command[0]).is_absolute() and Path(command[0]).exists(), hint
    r = subprocess.run([*command[: command.index("ui")], "--help"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout


def test_an_unexpected_error_names_its_innermost_cause_and_ours_keep_their_exit_code(monkeypatch, capsys):
    """MONAI wraps a transform's failure in 'applying transform <LoadImaged object at 0x..>': the
    last-resort line also gives the innermost cause (here the truncated file's EOFError), without
    object addresses; one of our errors raised inside such a wrapper is printed as ours, with its
    exit code. Before, the line was the wrapper's alone, and ours became exit 1 with its text lost."""
    import pipeline.cli
    from pipeline.errors import UsageError

    class LoadImaged:
        pass

    def truncated(a):
        try:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        except EOFError as e:
            raise RuntimeError(f"applying transform {LoadImaged()}") from e

    def ours(a):
        try:
            raise UsageError("setting 'x': expected an integer")
        except UsageError as e:
            raise RuntimeError("applying transform") from e

    monkeypatch.setattr(pipeline.cli, "cmd_synth", truncated)
    assert main(["synth", "--kind", "ct3d", "--out", "unused"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("segpipe synth: error: RuntimeError: applying transform LoadImaged -> EOFError: Compressed file "
                   "ended before the end-of-stream marker was reached (rerun with --debug for details)")
    monkeypatch.setattr(pipeline.cli, "cmd_synth", ours)
    assert main(["synth", "--kind", "ct3d", "--out", "unused"]) == 2
    assert capsys.readouterr().err.strip() == "segpipe synth: error: setting 'x': expected an integer"


def test_a_mistyped_input_is_a_usage_error_like_a_mistyped_bundle(tmp_path, capsys):
    """Both are command-line mistakes: exit 2 (a missing --input was 1, "the work failed"), one line,
    no output folder left behind."""
    from pathlib import Path

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "phantom_ct_3d"
    out = tmp_path / "out"
    assert main(["predict", str(bundle), "--input", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert f"{tmp_path / 'nope'}: no such file or folder" in capsys.readouterr().err and not out.exists()
    assert main(["predict", str(tmp_path / "nobundle"), "--input", str(tmp_path), "--output", str(out)]) == 2


def test_a_crash_below_python_prints_where_python_was(tmp_path):
    """A fatal signal (a SIGABRT in torch or gloo, a SIGSEGV in ITK) after ``main`` started prints
    each thread's Python stack before the process dies, without PYTHONFAULTHANDLER; under torchrun
    the ranks otherwise leave only "Signal 6 (SIGABRT) received"."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    code = ("import os\nfrom pipeline.cli import main\nmain(['validate', 'missing.json'])\n"
            "def crash_site():\n    os.abort()\ncrash_site()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "Fatal Python error: Aborted" in proc.stderr and "in crash_site" in proc.stderr, proc.stderr[-2000:]
