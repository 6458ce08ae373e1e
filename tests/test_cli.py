"""`python -m hift_rt finetune`: the main job from the command line (hift_rt/job/ through
hift_rt/cli.py), in this process. The crash tests with real signals are in test_cli_crash.py."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hift_rt import checkpoint, job
from hift_rt.job import data, report, train
from hift_rt.cli import main

FAST = ["--batch-size", "2", "--seq-len", "32", "--warmup-steps", "2"]


def run(*argv):
    return main(["finetune", *FAST, *map(str, argv)])


def tiny_hf_model(directory, hidden=32):
    """A 2-layer Llama (4 groups) with a byte vocabulary, saved to `directory`: the multi-step
    tests train it rather than the default model, whose steps take seconds each in Triton's
    interpreter (the suite's kernel path on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small") / "model"
    tiny_hf_model(directory)
    return directory


def test_default_job_trains_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert run("--steps", 4, "--json", out) == 0
    printed = capsys.readouterr()
    assert "RANDOM weights" in printed.err + printed.out
    assert "note: the model started from random weights" in printed.out
    assert "held-out loss start -> end" in printed.out
    (result,) = json.loads(out.read_text())
    assert result["method"] == "hift" and result["steps"] == 4 and result["groups"] == 6
    assert len(result["losses"]) == 4 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["first_loss"] == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.3)


def test_compare_full_and_plot(tmp_path, small, capsys):
    plot, out = tmp_path / "curves.png", tmp_path / "runs.json"
    assert run("--steps", 4, "--compare", "full", "--plot", plot, "--json", out, "--model", small) == 0
    table = capsys.readouterr().out
    assert "hift" in table and "full" in table and "tokens/s" in table
    assert "loss at equal time" in table
    assert plot.stat().st_size > 1000
    hift, full = json.loads(out.read_text())
    assert (hift["method"], full["method"]) == ("hift", "full") and full["groups"] == 1
    faster, slower = sorted((hift, full), key=lambda r: sum(r["step_seconds"]))
    assert faster["equal_time"] == {"seconds": sum(faster["step_seconds"]), "steps": 4,
                                    "loss": pytest.approx(sum(faster["losses"]) / 4)}
    assert slower["equal_time"]["seconds"] == sum(faster["step_seconds"])
    assert 0 <= slower["equal_time"]["steps"] <= 4


def test_equal_time_takes_each_run_at_the_seconds_of_the_shortest_run():
    fast = {"method": "hift", "step_seconds": [1.0] * 6, "losses": [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]}
    slow = {"method": "full", "step_seconds": [2.0] * 6, "losses": [5.0, 3.0, 2.0, 1.0, 0.5, 0.25]}
    report.add_equal_time([fast, slow])
    # the fast run took 6 s in all; in 6 s the slow one made 3 steps
    assert fast["equal_time"] == {"seconds": 6.0, "steps": 6, "loss": 3.5}   # mean of its 6 losses (< 10)
    assert slow["equal_time"] == {"seconds": 6.0, "steps": 3, "loss": 10 / 3}


def test_save_and_resume_continue_to_the_same_numbers(tmp_path, small):
    whole, part, resumed = tmp_path / "whole", tmp_path / "part", tmp_path / "resumed"
    # 4 groups: the resumed run starts mid-cycle and crosses into the next (random order)
    options = ["--model", small, "--strategy", "random"]
    assert run("--steps", 10, "--save", whole, *options, "--json", tmp_path / "a.json") == 0
    assert run("--steps", 3, "--save", part, *options) == 0
    assert run("--steps", 10, "--resume", part, "--save", resumed, "--json", tmp_path / "b.json") == 0
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses_a = json.loads((tmp_path / "a.json").read_text())[0]["losses"]
    losses_b = json.loads((tmp_path / "b.json").read_text())[0]["losses"]
    assert losses_a == losses_b


def test_ctrl_c_in_the_middle_of_a_step_saves_at_its_end_and_resumes_exactly(tmp_path, small, monkeypatch, capsys):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    assert run("--steps", 7, "--save", whole, "--grad-accum", 2, "--model", small) == 0
    calls = {"n": 0}
    original = data.WindowSampler.next

    def next_and_ctrl_c(self):
        calls["n"] += 1
        if calls["n"] == 9:  # the first micro-batch of step 5 (two per step)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(data.WindowSampler, "next", next_and_ctrl_c)
    assert run("--steps", 7, "--save", interrupted, "--grad-accum", 2, "--model", small) == 130
    assert "interrupted at step 5: checkpoint saved" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back
    monkeypatch.setattr(data.WindowSampler, "next", original)
    assert calls["n"] == 10 and checkpoint.manifest(interrupted)["step"] == 5
    assert run("--steps", 7, "--resume", interrupted, "--save", interrupted, "--grad-accum", 2) == 0
    a, b = load_file(whole / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_first_ctrl_c_asks_to_stop_the_second_interrupts_at_once():
    with train.StopOnCtrlC() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_data_files_txt_and_jsonl(tmp_path, small):
    text = "hello hift_rt. " * 200
    (tmp_path / "d.txt").write_text(text)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": text[i:i + 300]}) for i in range(0, 3000, 300)))
    assert run("--steps", 2, "--data", tmp_path / "d.txt", "--model", small) == 0
    assert run("--steps", 2, "--data", tmp_path / "d.jsonl", "--model", small) == 0


def test_local_hf_model_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    assert run("--steps", 2, "--model", tmp_path / "m") == 0


def assert_one_line(capsys, message):
    """stderr ends with one `hift-rt: error:` line holding `message` (before it at most the
    progress bar); returns (stdout, that line)."""
    printed = capsys.readouterr()
    err = printed.err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("hift-rt: error: ") and message in last, err
    assert err.count("hift-rt: error") == 1 and "Traceback" not in err, err
    assert not any("rror" in line for line in err.splitlines()[:-1]), err  # nothing else reported a failure
    return printed.out, last


def make_input(tmp_path, make):
    if make == "d.csv":
        (tmp_path / make).write_text("a,b\n")
    elif make == "bad.jsonl":
        (tmp_path / make).write_text(json.dumps({"body": "x"}) + "\n")
    elif make == "latin1.jsonl":
        (tmp_path / make).write_bytes(json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"))
    elif make == "binary.jsonl":
        (tmp_path / make).write_bytes(bytes(range(256)) * 4)
    elif make == "deep.jsonl":
        (tmp_path / make).write_text("[" * 100000)
    elif make in ("empty_model", "ckpt"):
        (tmp_path / make).mkdir()
        (tmp_path / make / "config.json").write_text("{}")
    elif make == "truncated_safetensors":
        tiny_hf_model(tmp_path / make)
        weights = tmp_path / make / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    elif make == "random_safetensors":
        tiny_hf_model(tmp_path / make)
        (tmp_path / make / "model.safetensors").write_bytes(os.urandom(3000))
    elif make == "truncated_bin":
        model = tiny_hf_model(tmp_path / make)
        (tmp_path / make / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / make / "pytorch_model.bin")
        weights = tmp_path / make / "pytorch_model.bin"
        weights.write_bytes(weights.read_bytes()[:20000])
    elif make == "file":
        (tmp_path / make).write_text("not a directory")


@pytest.mark.parametrize("make,argv,message", [
    (None, ["--data", "missing.txt"], "--data: no such file: missing.txt"),
    ("d.csv", ["--data", "{}/d.csv"], "--data must be a .txt file or a .jsonl file"),
    ("bad.jsonl", ["--data", "{}/bad.jsonl"], 'line 1 has no string field "text"'),
    ("latin1.jsonl", ["--data", "{}/latin1.jsonl"], "latin1.jsonl: not UTF-8 text (byte 13: invalid continuation"),
    ("binary.jsonl", ["--data", "{}/binary.jsonl"], "binary.jsonl: not UTF-8 text (byte 128"),
    ("deep.jsonl", ["--data", "{}/deep.jsonl"], "line 1 is nested too deeply"),
    ("empty_model", ["--model", "{}/empty_model"], "no weights (*.safetensors or *.bin)"),
    ("truncated_safetensors", ["--model", "{}/truncated_safetensors"], "cannot load the model (SafetensorError"),
    ("random_safetensors", ["--model", "{}/random_safetensors"], "cannot load the model ("),
    ("truncated_bin", ["--model", "{}/truncated_bin"], "cannot load the model ("),
    (None, ["--model", "nowhere"], "--model: no such directory: nowhere"),
    (None, ["--seq-len", "5000"], "--seq-len 5000 is beyond the model's 1024 positions"),
    (None, ["--compare", "full", "--dtype", "fp16"], "--compare full needs --dtype fp32 or bf16"),
    (None, ["--master", "kahan"], "--master kahan needs --dtype bf16 or fp16 (fp32 weights are their own master)"),
    (None, ["--master", "fp32", "--dtype", "fp32"], "--master fp32 needs --dtype bf16 or fp16"),
    (None, ["--steps", "0"], "--steps must be >= 1"),
    (None, ["--units-per-group", "0"], "--units-per-group must be >= 1"),
    (None, ["--save-every", "-1"], "--save-every must be >= 0"),
    (None, ["--save-every", "2"], "--save-every needs --save DIR"),
    (None, ["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (None, ["--lr", "inf"], "--lr must be a finite number >= 0, got inf"),
    (None, ["--lr", "-1"], "--lr must be a finite number >= 0, got -1.0"),
    (None, ["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number >= 0, got nan"),
    (None, ["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (None, ["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    (None, ["--device", "meta"], "--device meta: expected auto, cpu, cuda or cuda:N"),
    (None, ["--device", "cuda:x"], "--device cuda:x: expected auto, cpu, cuda or cuda:N"),
    (None, ["--seed", str(2 ** 70)], "--seed must be in 0..9223372036854775807"),
    (None, ["--seed", "-1"], "--seed must be in 0..9223372036854775807"),
    ("ckpt", ["--resume", "{}/ckpt"], "--resume {}/ckpt: no hift_rt_state.pt"),
    (None, ["--resume", "{}/nowhere"], "--resume: no such directory: {}/nowhere"),
    ("ckpt", ["--resume", "{}/ckpt", "--compare", "full"], "--compare full trains from the start"),
    # output paths, checked before anything is built or trained
    ("file", ["--save", "{}/file/ckpt"], "--save {}/file/ckpt: {}/file is a file, not a directory"),
    ("file", ["--save", "{}/file"], "--save: {}/file exists and is not a directory"),
    (None, ["--json", "{}/missing/r.json"], "--json {}/missing/r.json: no such directory: {}/missing"),
    (None, ["--plot", "{}/missing/c.png"], "--plot {}/missing/c.png: no such directory: {}/missing"),
    (None, ["--json", "{}"], "--json: {} is a directory"),
])
def test_bad_input_gets_one_clear_line(tmp_path, capsys, make, argv, message):
    make_input(tmp_path, make)
    capsys.readouterr()  # save_pretrained's progress bar
    argv = [a.format(tmp_path) for a in argv]
    assert run(*argv) == 2
    out, _ = assert_one_line(capsys, message.format(tmp_path, tmp_path))
    assert "hift:" not in out  # refused before training


def test_read_only_output_directories_are_refused_before_training(tmp_path, capsys):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        (read_only / "probe").touch()
        read_only = Path("/proc")  # permissions do not bind this user (root): a directory nobody writes
    except PermissionError:
        pass
    for option, target in (("--save", read_only / "ckpt"), ("--json", read_only / "r.json"),
                           ("--plot", read_only / "c.png")):
        assert run("--steps", 1, option, target) == 2
        out, _ = assert_one_line(capsys, f"cannot write into {read_only} (")
        assert "hift:" not in out


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small):
    """Checkpoints of 3 steps: `default` of the small model, `small` of a smaller one (another size)."""
    root = tmp_path_factory.mktemp("saved")
    tiny_hf_model(root / "smaller_model", hidden=16)
    assert main(["finetune", *FAST, "--steps", "3", "--save", str(root / "default"), "--model", str(small)]) == 0
    assert main(["finetune", *FAST, "--steps", "3", "--save", str(root / "small"),
                 "--model", str(root / "smaller_model")]) == 0
    return root


def copy_with(source, target, replace=None):
    """A consistent checkpoint (fresh manifest) of `source`'s files, some replaced: {name: path}."""
    replace = replace or {}

    def write(directory):
        for name in checkpoint.manifest(source)["files"]:
            shutil.copy(replace.get(name, source / name), directory / name)

    checkpoint.save(target, write, checkpoint.manifest(source)["step"])
    return target


@pytest.mark.parametrize("argv,message", [
    (["--units-per-group", "2"], "was saved with --units-per-group 1; this run asks for --units-per-group 2"),
    (["--optim", "sgd"], "was saved with --optim adamw; this run asks for --optim sgd"),
    (["--strategy", "top_down"], "was saved with --strategy bottom_up; this run asks for --strategy top_down"),
    (["--dtype", "bf16"], "was saved with --dtype fp32; this run asks for --dtype bf16"),
    (["--lr", "0.01"], "was saved with --lr 0.001; this run asks for --lr 0.01"),
    (["--weight-decay", "0.1"], "was saved with --weight-decay 0.0; this run asks for --weight-decay 0.1"),
    (["--steps", "2"], "is at step 3, beyond --steps 2: give --steps 3 or more"),
])
def test_resume_refuses_options_that_contradict_the_checkpoint(saved, capsys, argv, message):
    before = (saved / "default" / job.STATE_FILE).read_bytes()
    assert run("--steps", 5, "--resume", saved / "default", "--save", saved / "default", *argv) == 2
    assert_one_line(capsys, f"--resume {saved / 'default'} {message}" if "beyond" in message else message)
    assert (saved / "default" / job.STATE_FILE).read_bytes() == before


def test_resume_takes_the_saved_run_options(tmp_path, small):
    first, resumed = tmp_path / "first", tmp_path / "resumed.json"
    options = ["--optim", "sgd", "--strategy", "top_down", "--units-per-group", "2", "--lr", "0.01"]
    assert run("--steps", 2, "--save", first, "--model", small, *options) == 0
    assert run("--steps", 3, "--resume", first, "--json", resumed) == 0
    (result,) = json.loads(resumed.read_text())
    assert result["steps"] == 3 and result["groups"] == 2 and len(result["losses"]) == 3
    assert torch.load(first / job.STATE_FILE, weights_only=True)["job"] == {
        "optim": "sgd", "strategy": "top_down", "units_per_group": 2, "dtype": "fp32", "lr": 0.01, "weight_decay": 0.0,
        "state_dtype": "fp32", "master": "auto"}


def saved_state(directory):
    """(job options, optimizer state by parameter name, weights by name) of a checkpoint."""
    from transformers import AutoModelForCausalLM

    state = torch.load(directory / job.STATE_FILE, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    optimizer = state["method"]["optimizer"]
    names = [name for group in optimizer["hift"]["groups"] for name in group]  # parameter index -> name
    entries = {names[i]: entry for i, entry in optimizer["state"].items()}
    return state["job"], optimizer["hift"], entries, dict(model.named_parameters())


def test_state_dtype_and_master_reach_the_optimizer_and_another_format_on_resume_converts(tmp_path, small, capsys):
    compact, converted, continued = tmp_path / "int8", tmp_path / "fp32", tmp_path / "bf16"
    bf16 = ["--dtype", "bf16", "--strategy", "random"]
    assert run("--steps", 3, "--save", compact, "--model", small, *bf16, "--state-dtype", "int8", "--master", "kahan") == 0
    options, hift, int8, _ = saved_state(compact)
    assert (options["state_dtype"], options["master"], hift["state_dtype"], hift["master_weights"]) == \
        ("int8", "kahan", "int8", "kahan")
    assert int8 and all(e["exp_avg"].dtype == torch.uint8 and e["compensation"].dtype == torch.bfloat16
                        for e in int8.values())
    # the same step, in another format: nothing trains, the converted state is saved
    capsys.readouterr()
    assert run("--steps", 3, "--resume", compact, "--save", converted, "--state-dtype", "fp32", "--master", "fp32") == 0
    assert "was saved with --state-dtype int8; its optimizer state is converted to --state-dtype fp32" in \
        capsys.readouterr().out
    options, hift, fp32, weights = saved_state(converted)
    assert (options["state_dtype"], options["master"], hift["state_dtype"], hift["master_weights"]) == \
        ("fp32", "fp32", "fp32", "fp32")
    assert fp32.keys() == int8.keys()
    for name, entry in fp32.items():
        assert entry["step"] == int8[name]["step"]
        # fp32 master = bf16 weights + Kahan compensation; a dequantized block's largest magnitude
        # is its saved absmax (the dynamic code holds +-1 exactly)
        assert torch.equal(entry["master"], weights[name].detach().float() + int8[name]["compensation"].float())
        for moment in ("exp_avg", "exp_avg_sq"):
            assert entry[moment].dtype == torch.float32
            padded = torch.zeros(int8[name][f"{moment}_absmax"].numel() * 128)
            padded[:entry[moment].numel()] = entry[moment].reshape(-1).abs()
            assert torch.equal(padded.view(-1, 128).amax(1), int8[name][f"{moment}_absmax"]), (name, moment)
    # and training goes on from a converted state (a third format)
    result = tmp_path / "continued.json"
    assert run("--steps", 5, "--resume", converted, "--save", continued, "--state-dtype", "bf16", "--master", "none",
               "--json", result) == 0
    (continued_run,) = json.loads(result.read_text())
    assert continued_run["steps"] == 5 and all(math.isfinite(x) for x in continued_run["losses"])
    options, hift, bf16_state, _ = saved_state(continued)
    assert (options["state_dtype"], options["master"], hift["master_weights"]) == ("bf16", "none", None)
    assert all(e["exp_avg"].dtype == torch.bfloat16 and "master" not in e for e in bf16_state.values())


def test_under_torchrun_only_rank_0_prints_usage_and_errors(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    assert run("--steps", 0) == 2  # refused before the process group: no torchrun needed
    with pytest.raises(SystemExit) as exit_info:
        run("--strategy", "sideways")
    assert exit_info.value.code == 2
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    assert run("--steps", 0) == 2
    assert_one_line(capsys, "--steps must be >= 1, got 0")
    monkeypatch.delenv("RANK")
    assert run("--steps", 1) == 2
    assert_one_line(capsys, "WORLD_SIZE is 2 but RANK and LOCAL_RANK are not both set to numbers: start the job "
                            "with torchrun")


@pytest.mark.parametrize("damage,message", [
    ("truncated state", "hift_rt_state.pt does not match the manifest's checksum"),
    ("empty state", "hift_rt_state.pt does not match the manifest's checksum"),
    ("random state", "hift_rt_state.pt does not match the manifest's checksum"),
    ("flipped weights", "model.safetensors does not match the manifest's checksum"),
    ("no weights", "model.safetensors is missing (the manifest lists it)"),
    ("no manifest", "no hift_rt_checkpoint.json: not a complete checkpoint written by --save"),
    ("state of another step", "hift_rt_state.pt is not the state of the manifest's step 3"),
    ("state of a smaller model", "cannot load the training state ("),
    ("random state, fresh manifest", "cannot read hift_rt_state.pt ("),
])
def test_resume_refuses_a_damaged_or_mismatched_checkpoint(saved, tmp_path, capsys, damage, message):
    source = saved / "default"
    directory = tmp_path / "ckpt"
    state = directory / job.STATE_FILE
    if damage == "state of a smaller model":
        copy_with(source, directory, {job.STATE_FILE: saved / "small" / job.STATE_FILE})
    elif damage == "random state, fresh manifest":
        (tmp_path / "random.pt").write_bytes(os.urandom(5000))
        copy_with(source, directory, {job.STATE_FILE: tmp_path / "random.pt"})
    elif damage == "state of another step":
        other = torch.load(source / job.STATE_FILE, weights_only=True)
        other["step"] = 2
        torch.save(other, tmp_path / "other.pt")
        copy_with(source, directory, {job.STATE_FILE: tmp_path / "other.pt"})
    else:
        shutil.copytree(source, directory)
    if damage == "truncated state":
        state.write_bytes(state.read_bytes()[:1000])
    elif damage == "empty state":
        state.write_bytes(b"")
    elif damage == "random state":
        state.write_bytes(os.urandom(state.stat().st_size))
    elif damage == "flipped weights":
        data = bytearray((directory / "model.safetensors").read_bytes())
        data[-100] ^= 0xFF
        (directory / "model.safetensors").write_bytes(bytes(data))
    elif damage == "no weights":
        (directory / "model.safetensors").unlink()
    elif damage == "no manifest":
        (directory / checkpoint.MANIFEST).unlink()
    assert run("--steps", 5, "--resume", directory) == 2
    assert_one_line(capsys, f"--resume {directory}: {message}")


def test_a_loss_that_becomes_nan_stops_the_run_without_saving_over_a_good_checkpoint(saved, small, tmp_path, capsys):
    directory = shutil.copytree(saved / "default", tmp_path / "ckpt")
    before = {name: (directory / name).read_bytes() for name in checkpoint.manifest(directory)["files"]}
    assert run("--steps", 6, "--lr", "1e30", "--save", directory, "--model", small) == 2
    _, line = assert_one_line(capsys, f"(--lr 1e+30 too high?): stopped, nothing saved over {directory}")
    assert re.search(r"hift: the training loss became (nan|inf) at step \d ", line), line
    assert {name: (directory / name).read_bytes() for name in before} == before


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
