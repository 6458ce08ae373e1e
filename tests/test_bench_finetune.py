"""CPU smoke test of `python -m hift_rt.bench finetune` (figures printed, nothing about speed)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from hift_rt import methods as hift_methods
from hift_rt.bench import finetune as bench
from hift_rt.bench.__main__ import main
from hift_rt.engine import EngineError


def test_finetune_bench_runs_every_method_on_the_tiny_preset(tmp_path):
    methods = ["full", "full-bf16", "layerwise-sync", "hift", "hift-bf16", "hift-nooffload", "hift-bf16-int8",
               "hift-bf16-int8-kahan"]
    if importlib.util.find_spec("peft"):
        methods.append("lora")
    out = tmp_path / "ft.json"
    # As a user runs it on a CPU: the kernels' torch path (the Triton interpreter, which the
    # suite turns on, would take a minute for what takes a second).
    done = subprocess.run([sys.executable, "-m", "hift_rt.bench", "finetune", "--preset", "tiny", "--seq", "16",
                           "--methods", ",".join(methods), "--cycles", "1", "--rounds", "2", "--json", str(out)],
                          env={**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["preset"] == "tiny" and report["params_M"] > 0 and report["rounds"] == 2
    for name in methods:
        r = report["methods"][name]
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["setup_s"] > 0, name
        assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"] and len(r["rounds_step_s"]) == 2, name
        assert r["host_rss_GiB"] > 0, name
    k = report["methods"]["hift"]["groups"]
    assert k == 6 and report["methods"]["full"]["groups"] == 1 and report["methods"]["layerwise-sync"]["groups"] == 6
    hift = report["methods"]["hift"]
    assert hift["transfers"]["h2d"]["bytes"] > 0 and hift["transfers"]["d2h"]["bytes"] > 0
    mem = hift["breakdown_bytes"]
    assert mem["state_host"] > mem["state_device"] > 0
    assert hift["pinned_GiB"] * 2 ** 30 == mem["state_host"]
    assert report["methods"]["hift-nooffload"]["pinned_GiB"] == 0 and report["methods"]["full"]["pinned_GiB"] == 0
    # AdamW on bf16 weights: fp32 m, v and master on the host, 12 bytes per element of the flat
    # buffers (the parameters and their alignment gaps), each field 64-byte aligned
    params = report["params_M"] * 1e6
    bf16 = report["methods"]["hift-bf16"]["breakdown_bytes"]
    elements = bf16["weights"] // 2
    assert params <= elements and 12 * elements <= bf16["state_host"] <= 12 * elements + 3 * 64 * k
    # compact state (issue 12's targets): int8 moments (a code and one fp32 absmax per 128 elements,
    # a parameter owning whole blocks) + fp32 master <= 6.1 bytes, + kahan (bf16) <= 4.1
    for name, low, high in (("hift-bf16-int8", 6.0625, 6.1), ("hift-bf16-int8-kahan", 4.0625, 4.1)):
        host = report["methods"][name]["breakdown_bytes"]["state_host"]
        assert low * elements <= host <= high * elements, (name, host / elements)
    assert "hift-bf16-int8-kahan / hift-bf16 (fp32 state and master): step time" in done.stdout
    sync = report["methods"]["layerwise-sync"]["breakdown_bytes"]
    tiny = bench.PRESETS["tiny"]
    layer = 4 * tiny.hidden ** 2 + 3 * tiny.hidden * tiny.intermediate + 2 * tiny.hidden
    # at its peak a step holds the largest group's m, v (a layer's) on the device, the others' on
    # the CPU (the smallest group, the embeddings, active)
    assert sync["state_device"] == 8 * layer and sync["state_host"] == 8 * (round(params) - tiny.vocab * tiny.hidden)
    assert "hift: step time" in done.stdout and "min..max" in done.stdout


@pytest.mark.parametrize("name,per_parameter", [("hift-bf16", 12), ("hift-bf16-int8-kahan", 2 * (1 + 4 / 128) + 2)])
def test_short_pinned_memory_is_reported_with_the_bytes_the_state_needed(tmp_path, monkeypatch, capsys, name,
                                                                          per_parameter):
    class OutOfPinnedMemory(hift_methods.HiFT):
        def __init__(self, model, settings):
            raise EngineError("cudaHostAlloc: out of memory")

    monkeypatch.setitem(bench.METHODS, name, bench.METHODS[name]._replace(cls=OutOfPinnedMemory))
    out = tmp_path / "ft.json"
    assert main(["finetune", "--preset", "tiny", "--methods", name, "--cycles", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    entry = report["methods"][name]
    assert entry["error"] == "cudaHostAlloc: out of memory"
    assert entry["state_host_needed_GiB"] * 2 ** 30 == pytest.approx(per_parameter * report["params_M"] * 1e6,
                                                                     rel=1e-6)
    assert "its state needs" in capsys.readouterr().out


def test_compile_option_compiles_full_and_hift_once_per_variant(tmp_path):
    """`--compile aot_eager`: every graph is compiled in the warm-up cycle, none in the timed ones;
    full fine-tuning needs one graph for the blocks and one for the final norm (nothing freezes),
    hift 3 for the blocks (active, frozen above it, frozen below it) and 2 for the norm."""
    out = tmp_path / "ft.json"
    done = subprocess.run([sys.executable, "-m", "hift_rt.bench", "finetune", "--preset", "tiny", "--seq", "16",
                           "--methods", "full,hift", "--cycles", "1", "--compile", "aot_eager", "--json", str(out)],
                          env={**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["compile"] == "aot_eager"
    full, hift = report["methods"]["full"], report["methods"]["hift"]
    assert (full["graphs_warmup"], full["graphs_timed"]) == (2, 0)
    assert (hift["graphs_warmup"], hift["graphs_timed"]) == (5, 0)
    assert hift["warmup_s"] > 0 and hift["step_s"] > 0
    assert "hift: warm-up cycle" in done.stdout and "hift_rt.compile (backend aot_eager)" in done.stdout
