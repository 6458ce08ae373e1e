"""`python -m hift_rt finetune`: the main job from the command line."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hift_rt import finetune
from hift_rt.cli import main

FAST = ["--batch-size", "2", "--seq-len", "32", "--warmup-steps", "2"]


def run(*argv):
    return main(["finetune", *FAST, *map(str, argv)])


def test_default_job_trains_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert run("--steps", 8, "--json", out) == 0
    printed = capsys.readouterr()
    assert "RANDOM weights" in printed.err + printed.out
    assert "note: the model started from random weights" in printed.out
    assert "held-out loss start -> end" in printed.out
    (result,) = json.loads(out.read_text())
    assert result["method"] == "hift" and result["steps"] == 8 and result["groups"] == 6
    assert len(result["losses"]) == 8 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["first_loss"] == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.3)


def test_compare_full_and_plot(tmp_path, capsys):
    plot = tmp_path / "curves.png"
    assert run("--steps", 4, "--compare", "full", "--plot", plot) == 0
    table = capsys.readouterr().out
    assert "hift" in table and "full" in table and "tokens/s" in table
    assert plot.stat().st_size > 1000


def test_save_and_resume_continue_to_the_same_numbers(tmp_path):
    whole, part, resumed = tmp_path / "whole", tmp_path / "part", tmp_path / "resumed"
    assert run("--steps", 10, "--save", whole, "--strategy", "random", "--json", tmp_path / "a.json") == 0
    assert run("--steps", 4, "--save", part, "--strategy", "random") == 0
    assert run("--steps", 10, "--resume", part, "--save", resumed, "--strategy", "random",
               "--json", tmp_path / "b.json") == 0
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses_a = json.loads((tmp_path / "a.json").read_text())[0]["losses"]
    losses_b = json.loads((tmp_path / "b.json").read_text())[0]["losses"]
    assert losses_a == losses_b


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, monkeypatch, capsys):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    assert run("--steps", 9, "--save", whole) == 0
    calls = {"n": 0}
    original = finetune.WindowSampler.next

    def next_or_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(finetune.WindowSampler, "next", next_or_interrupt)
    assert run("--steps", 9, "--save", interrupted) == 130
    assert "interrupted at step 5: checkpoint saved" in capsys.readouterr().out
    monkeypatch.setattr(finetune.WindowSampler, "next", original)
    assert run("--steps", 9, "--resume", interrupted, "--save", interrupted) == 0
    a, b = load_file(whole / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_files_txt_and_jsonl(tmp_path):
    text = "hello hift_rt. " * 200
    (tmp_path / "d.txt").write_text(text)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": text[i:i + 300]}) for i in range(0, 3000, 300)))
    assert run("--steps", 2, "--data", tmp_path / "d.txt") == 0
    assert run("--steps", 2, "--data", tmp_path / "d.jsonl") == 0


def test_local_hf_model_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    assert run("--steps", 2, "--model", tmp_path / "m") == 0


@pytest.mark.parametrize("make,argv,message", [
    (None, ["--data", "missing.txt"], "--data: no such file: missing.txt"),
    ("d.csv", ["--data", "{}/d.csv"], "--data must be a .txt file or a .jsonl file"),
    ("bad.jsonl", ["--data", "{}/bad.jsonl"], 'line 1 has no string field "text"'),
    ("empty_model", ["--model", "{}/empty_model"], "no weights (*.safetensors or *.bin)"),
    (None, ["--model", "nowhere"], "--model: no such directory: nowhere"),
    (None, ["--seq-len", "5000"], "--seq-len 5000 is beyond the model's 1024 positions"),
    (None, ["--compare", "full", "--dtype", "fp16"], "--compare full needs --dtype fp32 or bf16"),
    (None, ["--steps", "0"], "--steps must be >= 1"),
    ("ckpt", ["--resume", "{}/ckpt"], "no hift_rt_state.pt"),
])
def test_bad_input_gets_one_clear_line(tmp_path, capsys, make, argv, message):
    if make == "d.csv":
        (tmp_path / make).write_text("a,b\n")
    elif make == "bad.jsonl":
        (tmp_path / make).write_text(json.dumps({"body": "x"}) + "\n")
    elif make in ("empty_model", "ckpt"):
        (tmp_path / make).mkdir()
        (tmp_path / make / "config.json").write_text("{}")
    argv = [a.format(tmp_path) for a in argv]
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hift-rt: error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_option_value_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("--strategy", "sideways")
    assert exit_info.value.code == 2
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_console_entry_points():
    done = subprocess.run([sys.executable, "-m", "hift_rt", "finetune", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--units-per-group" in done.stdout
    script = shutil.which("hift-rt")
    assert script, "pip install should put the hift-rt command on PATH"
    done = subprocess.run([script, "info"], capture_output=True, text=True)
    assert done.returncode == 0 and '"backend"' in done.stdout
