"""CPU smoke test of the kernel benchmark: the harness runs, prints a row per kernel and writes
the same figures with --json. It runs the torch path; the numbers themselves are not checked."""
import json
import os
import subprocess
import sys

import pytest

from hift_rt.bench import kernels as bench
from hift_rt.kernels import _common

ROWS = [
    ("copy", "fp32"),
    ("adamw", "fp32"),
    ("adamw", "fp32 clip+found_inf"),
    ("adamw", "bf16+master"),
    ("adagrad", "fp32"),
    ("sgd-momentum", "fp32"),
    ("sgd-momentum", "bf16+master"),
    ("grad_norm", "fp32 l2"),
    ("grad_norm", "bf16 l2"),
]


def test_cli_prints_rows_and_writes_json(tmp_path):
    path = tmp_path / "kernels.json"
    # The benchmark refuses the interpreter, which conftest switches on for the suite.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "hift_rt.bench", "kernels", "--device", "cpu",
         "--elements", "5000", "--reps", "3", "--json", str(path)],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    result = json.loads(path.read_text())
    assert result["path"] == "torch" and result["elements"] == 5000 and result["reps"] == 3
    assert [(row["kernel"], row["setting"]) for row in result["rows"]] == ROWS
    for row in result["rows"]:
        assert row["ms"] > 0 and row["GBps"] > 0 and row["copy_fraction"] > 0
        assert any(line.startswith(row["kernel"]) and row["setting"] in line for line in printed)
        if row["kernel"] == "copy":
            assert row["torch_baseline"] is None
            continue
        assert row["elements"] == 5000
        assert row["torch_ms"] > 0 and row["speedup"] == pytest.approx(row["torch_ms"] / row["ms"])
        assert row["GBps"] == pytest.approx(row["bytes_per_element"] * 5000 / row["ms"] / 1e6)
    baselines = {row["kernel"]: row["torch_baseline"] for row in result["rows"][1:]}
    assert "AdamW" in baselines["adamw"] and "SGD" in baselines["sgd-momentum"]
    assert baselines["adagrad"] == "foreach Adagrad"


def test_refuses_the_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "TRITON_ON_CPU", True)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET"):
        bench.run(elements=100, reps=1, device="cpu")


@pytest.mark.parametrize("total", [1, 1000, 5000, 256 << 10, 64 << 20])
def test_model_like_sizes(total):
    sizes = bench.model_like_sizes(total)
    assert sum(sizes) == total and all(size > 0 for size in sizes)
    if total >= 64 << 20:
        assert 50 <= len(sizes) <= 100
