"""CPU smoke test of `python -m hift_rt.bench finetune` (figures printed, nothing about speed)."""
import json
import importlib.util

from hift_rt.bench.__main__ import main


def test_finetune_bench_runs_every_method_on_the_tiny_preset(tmp_path, capsys):
    methods = ["full", "layerwise-sync", "hift", "hift-bf16", "hift-nooffload"]
    if importlib.util.find_spec("peft"):
        methods.append("lora")
    out = tmp_path / "ft.json"
    assert main(["finetune", "--preset", "tiny", "--methods", ",".join(methods), "--cycles", "1",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["preset"] == "tiny" and report["params_M"] > 0
    for name in methods:
        r = report["methods"][name]
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0, name
    k = report["methods"]["hift"]["groups"]
    assert k == 6 and report["methods"]["full"]["groups"] == 1
    hift = report["methods"]["hift"]
    assert hift["transfers"]["h2d"]["bytes"] > 0 and hift["transfers"]["d2h"]["bytes"] > 0
    mem = hift["breakdown_bytes"]
    assert mem["state_host"] > mem["state_device"] > 0
    assert "hift: step time" in capsys.readouterr().out
