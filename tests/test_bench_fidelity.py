"""`python -m hift_rt.bench fidelity` on the micro preset (CPU, seconds), and its report's arithmetic
on hand-made runs."""
import json
import math

import pytest

from hift_rt.bench import fidelity_report
from hift_rt.bench.__main__ import main
from hift_rt.bench.fidelity import FidelityError, parse_method

METHODS = ["full", "hift", "hift:strategy=random,upg=2,lr_policy=step"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """One micro run of three methods over two seeds: (report, cache dir, its --json path)."""
    tmp = tmp_path_factory.mktemp("fidelity")
    out = tmp / "micro.json"
    assert main(["fidelity", "--preset", "micro", "--cache-dir", str(tmp / "cache"), "--methods", *METHODS,
                 "--seeds", "0,1", "--json", str(out), "--plot", str(tmp / "micro.png")]) == 0
    assert (tmp / "micro.png").stat().st_size > 0
    return json.loads(out.read_text()), tmp / "cache", out


def test_micro_report_structure_and_numbers(micro):
    report, _, _ = micro
    settings = report["settings"]
    assert settings["preset"] == "micro" and settings["steps"] == 16 and settings["seeds"] == [0, 1]
    assert report["stage1"]["cached"] is False and len(report["stage1"]["key"]) == 16
    assert report["corpora"]["B"]["modules"] == sorted(report["corpora"]["B"]["modules"])
    # hift with 4 units (embeddings, 2 blocks, head): k = 4 with upg=1, 2 with upg=2; so full runs
    # T = 16, T/2 = 8 (the target and k = 2) and T/4 = 4 steps.
    runs = {(r["method"], r["lr"], r["seed"], r["steps"]): r for r in report["runs"]}
    expected = {("full", 3e-3, seed, n) for seed in (0, 1) for n in (4, 8, 16)}
    expected |= {(m, 3e-3, seed, 16) for m in METHODS[1:] for seed in (0, 1)}
    assert set(runs) == expected
    assert runs[("hift", 3e-3, 0, 16)]["groups"] == 4 and runs[(METHODS[2], 3e-3, 0, 16)]["groups"] == 2
    for run in report["runs"]:
        evals = run["evals"]
        assert [e["step"] for e in evals] == sorted({*range(0, run["steps"] + 1, 4), run["steps"]})
        assert all(math.isfinite(e[k]) for e in evals for k in ("loss_A", "loss_B"))
        assert run["step_s"] > 0
        assert evals[0]["loss_B"] == pytest.approx(report["stage1"]["heldout_B"], rel=1e-5)
        assert evals[-1]["loss_B"] < evals[0]["loss_B"], (run["method"], run["steps"])  # fine-tuning works

    summary = report["summary"]
    rows = {row["method"]: row for row in summary["rows"]}
    assert list(rows) == METHODS and summary["reference"] == "full"
    assert summary["target"]["steps"] == 8
    assert rows["full"]["equal"]["steps"]["gap_pct"] == 0
    for method, k in (("hift", 4), (METHODS[2], 2)):
        row = rows[method]
        assert row["groups"] == k and row["loss_B"]["n"] == 2
        assert row["equal"]["updates"]["full"]["steps"] == 16 // k
        full_then = [runs[("full", 3e-3, s, 16 // k)]["evals"][-1]["loss_B"] for s in (0, 1)]
        assert row["equal"]["updates"]["gap_pct"] == pytest.approx(
            100 * (row["loss_B"]["mean"] / (sum(full_then) / 2) - 1))
        assert math.isfinite(row["forgetting_A"]["mean"]) and row["to_target"]["of"] == 2


def test_second_run_reuses_stage1_and_reproduces_the_runs(micro, tmp_path):
    first, cache, _ = micro
    out = tmp_path / "again.json"
    assert main(["fidelity", "--preset", "micro", "--cache-dir", str(cache), "--methods", "full", "--seeds", "0",
                 "--json", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["stage1"]["cached"] is True and again["stage1"]["key"] == first["stage1"]["key"]
    assert again["stage1"]["heldout_A"] == first["stage1"]["heldout_A"]
    before = next(r for r in first["runs"] if (r["method"], r["seed"], r["steps"]) == ("full", 0, 16))
    now = next(r for r in again["runs"] if r["steps"] == 16)
    assert [e["loss_B"] for e in now["evals"]] == [e["loss_B"] for e in before["evals"]]
    # A different stage 1 configuration is a different checkpoint.
    assert main(["fidelity", "--preset", "micro", "--cache-dir", str(cache), "--methods", "full", "--seeds", "0",
                 "--steps", "2", "--evals", "1", "--pretrain-steps", "5", "--json", str(out)]) == 0
    other = json.loads(out.read_text())
    assert other["stage1"]["cached"] is False and other["stage1"]["key"] != first["stage1"]["key"]


def test_merge_of_split_reports_gives_the_same_summary(micro, tmp_path):
    report, _, path = micro
    parts = []
    for seed in (0, 1):
        part = dict(report, runs=[r for r in report["runs"] if r["seed"] == seed],
                    settings=dict(report["settings"], seeds=[seed]))
        parts.append(tmp_path / f"seed{seed}.json")
        parts[-1].write_text(json.dumps(part))
    merged = fidelity_report.merge([str(p) for p in parts])
    assert merged["settings"]["seeds"] == [0, 1]
    assert fidelity_report.summarize(merged) == report["summary"]
    with pytest.raises(fidelity_report.ReportError, match="in two reports"):
        fidelity_report.merge([str(path), str(path)])
    # another lr grid for full: the grids are unioned, the best lr picked over both
    other = dict(report, runs=[dict(r, lr=1e-3, evals=[dict(e, loss_B=e["loss_B"] + 0.5) for e in r["evals"]])
                               for r in report["runs"] if r["method"] == "full"],
                 settings=dict(report["settings"], methods=["full"], grids={"full": [1e-3]}))
    (tmp_path / "other.json").write_text(json.dumps(other))
    merged = fidelity_report.merge([str(path), str(tmp_path / "other.json")])
    assert merged["settings"]["grids"]["full"] == [1e-3, 3e-3]
    assert {"method": "full", "lr": 3e-3} in fidelity_report.summarize(merged)["best"]


@pytest.mark.parametrize("spec, message", [
    ("sgd", "must start with one of full, lora, .*, hift, badam, lisa"),
    ("hift:upg", "is not key=value"),
    ("hift:upg=2,units_per_group=3", "given twice"),
    ("hift:seed=3", "set by the benchmark"),
    ("hift:lr=fast", "must be numbers"),
    ("hift:lr=1e-3/-1", "positive"),
    ("hift:dtype=int4", "dtype must be one of"),
    ("full:strategy=random", "full takes only"),
    ("badam:rank=8", "badam has no option rank .its options: switch_every, switch_mode"),
    ("lisa:seed=1", "set by the benchmark"),
])
def test_bad_method_specs_are_named(spec, message):
    with pytest.raises(FidelityError, match=message):
        parse_method(spec)


def test_method_spec_options_reach_wrap_as_python_values():
    method = parse_method("hift:strategy=random,upg=2,lr_policy=step,lr=1e-3/3e-3,dtype=bf16,foreach=false")
    assert method.kind == "hift" and method.lrs == (1e-3, 3e-3) and method.dtype == "bf16"
    assert method.label == "hift:strategy=random,upg=2,lr_policy=step,dtype=bf16,foreach=false"
    assert parse_method("full:lr=1e-3").label == "full"
    assert dict(method.options) == {"strategy": "random", "units_per_group": 2, "lr_policy": "step", "foreach": False}


def test_bad_input_exits_2_before_any_training(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["fidelity", "--preset", "micro", "--cache-dir", str(cache), "--methods", "hift:strategy=sideways"]) == 2
    assert "hift_rt.wrap refused" in capsys.readouterr().err
    assert main(["fidelity", "--preset", "micro", "--steps", "4", "--target-steps", "9"]) == 2
    assert "--target-steps" in capsys.readouterr().err
    assert not cache.exists()


def _run(method, lr, steps, losses, step_s, seed=0, groups=1, kind=None):
    every = steps // (len(losses) - 1)
    return {"method": method, "kind": kind or method.split(":")[0], "lr": lr, "seed": seed, "steps": steps,
            "groups": groups, "step_s": step_s,
            "evals": [{"step": i * every, "loss_B": b, "loss_A": 1.0 + i * 0.1} for i, b in enumerate(losses)]}


def test_budgets_on_hand_made_runs():
    # full at lengths 2, 4 and 8 (k = 4 for hift), 1 s/step; its best lr differs by length.
    runs = [_run("full", 1e-3, 8, [4.0, 3.0, 2.0], 1.0), _run("full", 1e-3, 4, [4.0, 3.5, 2.8], 1.0),
            _run("full", 1e-3, 2, [4.0, 3.8, 3.6], 1.0), _run("full", 3e-3, 8, [4.0, 3.1, 2.2], 1.0),
            _run("full", 3e-3, 4, [4.0, 3.2, 2.6], 1.0), _run("full", 3e-3, 2, [4.0, 3.5, 3.2], 1.0),
            _run("hift", 3e-3, 8, [4.0, 3.0, 2.7], 0.5, groups=4),
            _run("hift", 3e-3, 8, [4.0, 3.0, 2.5], 0.7, groups=4, seed=1)]
    report = {"settings": {"steps": 8, "target_steps": 4, "methods": ["full", "hift"]}, "runs": runs}
    summary = fidelity_report.summarize(report)
    assert summary["target"] == {"lr": 3e-3, "steps": 4, "loss_B": 2.6}
    hift = summary["rows"][-1]
    assert hift["loss_B"] == {"mean": pytest.approx(2.6), "spread": pytest.approx(0.1), "n": 2}
    assert hift["step_s"] == pytest.approx(0.6)
    assert hift["equal"]["steps"]["full"]["loss_B"] == 2.0
    assert hift["equal"]["updates"]["full"] == {"lr": 3e-3, "steps": 2, "loss_B": 3.2}
    assert hift["equal"]["updates"]["gap_pct"] == pytest.approx(100 * (2.6 / 3.2 - 1))
    # 8 steps x 0.6 s = 4.8 s: between full's 4- and 8-step runs; lr 3e-3: 2.6 + 0.2 x (2.2 - 2.6).
    assert hift["equal"]["time"]["full"] == {"lr": 3e-3, "seconds": pytest.approx(4.8),
                                             "loss_B": pytest.approx(2.52), "between_steps": [4, 8]}
    # Seed 0 never reaches 2.6; seed 1 reaches it between step 4 (3.0) and 8 (2.5): at 4 + 4 x 0.8.
    assert hift["to_target"]["reached"] == 1 and hift["to_target"]["steps"]["mean"] == pytest.approx(7.2)
    assert hift["to_target"]["seconds"]["mean"] == pytest.approx(7.2 * 0.6)
    assert hift["forgetting_A"]["mean"] == pytest.approx(0.2)
    assert [(p["lr"], p["steps"], p["seconds"]) for p in summary["full_frontier"]] == [
        (lr, n, float(n)) for lr in (1e-3, 3e-3) for n in (2, 4, 8)]
    assert summary["full_frontier"][0]["forgetting_A"]["mean"] == pytest.approx(0.2)
    assert "not reached" not in fidelity_report.table({**report, "summary": summary, "environment": {"device": "cpu"},
                                                        "stage1": {"heldout_A": 1.0, "heldout_B": 4.0},
                                                        "settings": {**report["settings"], "preset": "x",
                                                                     "seeds": [0, 1], "clock": "cpu"}})


def test_crossing_and_frontier_edges():
    evals = [{"step": 0, "loss_B": 3.0}, {"step": 10, "loss_B": 2.0}, {"step": 20, "loss_B": 2.5}]
    assert fidelity_report.crossing_step(evals, 3.5) == 0
    assert fidelity_report.crossing_step(evals, 2.5) == pytest.approx(5)
    assert fidelity_report.crossing_step(evals, 1.9) is None
    runs = [_run("full", 1e-3, 8, [4.0, 3.0, 2.0], 1.0), _run("full", 1e-3, 4, [4.0, 3.5, 2.8], 1.0)]
    reference = fidelity_report._Reference(fidelity_report._grouped(runs), "full")
    assert reference.at_seconds(3.9) is None and reference.at_seconds(8.1) is None
    assert reference.at_seconds(8.0)["loss_B"] == 2.0
    assert reference.at_steps(5) is None
