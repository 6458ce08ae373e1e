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
    ("adamw", "fp32 clip"),
    ("adamw", "bf16+master"),
    ("adamw", "fp32 bf16 state"),
    ("adamw", "bf16+master bf16 state"),
    ("adamw", "bf16+kahan bf16 state"),
    ("adamw", "bf16 bf16 state"),
    ("adamw", "fp32 int8 state"),
    ("adamw", "bf16+master int8 state"),
    ("adamw", "bf16+kahan int8 state"),
    ("adamw", "bf16 int8 state"),
    ("adagrad", "fp32"),
    ("adagrad", "bf16+master"),
    ("adagrad", "fp32 int8 state"),
    ("adagrad", "bf16+kahan int8 state"),
    ("sgd-momentum", "fp32"),
    ("sgd-momentum", "bf16+master"),
    ("sgd-momentum", "fp32 int8 state"),
    ("sgd-momentum", "bf16+kahan int8 state"),
    ("grad_norm", "fp32 l2"),
    ("grad_norm", "bf16 l2"),
]
# Bytes per element, read + written (bench.bytes_per_element's docstring has the rule).
BYTES = {
    ("adamw", "fp32"): 28, ("adamw", "bf16+master"): 28, ("adamw", "fp32 bf16 state"): 20,
    ("adamw", "bf16+master bf16 state"): 20, ("adamw", "bf16+kahan bf16 state"): 18,
    ("adamw", "bf16 bf16 state"): 14, ("adamw", "fp32 int8 state"): 16.125,
    ("adamw", "bf16+master int8 state"): 16.125, ("adamw", "bf16+kahan int8 state"): 14.125,
    ("adamw", "bf16 int8 state"): 10.125, ("adagrad", "fp32"): 20,
    ("adagrad", "bf16+kahan int8 state"): 12.0625, ("sgd-momentum", "fp32 int8 state"): 14.0625,
}
ELEMENTS = 40 * 128  # a multiple of the int8 block


def test_cli_prints_rows_and_writes_json(tmp_path):
    path = tmp_path / "kernels.json"
    # The benchmark refuses the interpreter, which conftest switches on for the suite.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "hift_rt.bench", "kernels", "--device", "cpu",
         "--elements", str(ELEMENTS), "--reps", "3", "--json", str(path)],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    result = json.loads(path.read_text())
    assert result["path"] == "torch" and result["elements"] == ELEMENTS and result["reps"] == 3
    assert [(row["kernel"], row["setting"]) for row in result["rows"]] == ROWS
    ms = {(row["kernel"], row["setting"]): row["ms"] for row in result["rows"]}
    for row in result["rows"]:
        key = (row["kernel"], row["setting"])
        assert row["ms"] > 0 and row["GBps"] > 0 and row["copy_fraction"] > 0
        assert any(line.startswith(row["kernel"]) and row["setting"] in line for line in printed)
        if key in BYTES:
            assert row["bytes_per_element"] == BYTES[key]
        if row["kernel"] == "copy":
            assert row["torch_baseline"] is None
            continue
        assert row["elements"] == ELEMENTS
        assert row["GBps"] == pytest.approx(row["bytes_per_element"] * ELEMENTS / row["ms"] / 1e6)
        if " state" in row["setting"]:  # compact: against the fp32-state kernel, no torch figure
            assert row["torch_baseline"] is None and row["torch_ms"] is None
            reference = (row["kernel"], row["fp32_state_setting"])
            assert reference[1] == ("fp32" if row["setting"].startswith("fp32") else "bf16+master")
            assert row["fp32_state_speedup"] == pytest.approx(ms[reference] / row["ms"])
        else:
            assert row["fp32_state_speedup"] is None
            assert row["torch_ms"] > 0 and row["speedup"] == pytest.approx(row["torch_ms"] / row["ms"])
    baselines = {row["kernel"]: row["torch_baseline"] for row in result["rows"][1:]
                 if row["torch_baseline"] is not None}
    assert "AdamW" in baselines["adamw"] and "SGD" in baselines["sgd-momentum"]
    assert baselines["adagrad"].startswith("foreach Adagrad")


def test_elements_must_fill_int8_blocks(monkeypatch):
    monkeypatch.setattr(_common, "TRITON_ON_CPU", False)
    with pytest.raises(SystemExit, match="multiple of 128"):
        bench.run(elements=5000, reps=1, device="cpu")


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
