"""The fidelity benchmark's report: the budgets read off the runs, the table, the plot, and merging
the runs of several reports. Pure functions of the report's JSON (see fidelity.py for the runs
and the budgets' definitions); they call nothing of hift_rt and train nothing.

Per (method, lr) over seeds: mean and spread, the spread being half the range (for 2 seeds, mean
± spread are the two values). The reference is the first full method in the report's method list;
a gap is 100 x (method's mean / full's mean - 1), full at its best lr for that budget. A method's
best lr is the one of its grid with the lowest mean held-out B after T steps (full's too).

Memory (hift_rt.methods' rule): gradients + optimizer state on the device at the peak of a step,
counted from the tensors in the runs, as a fraction of full fine-tuning's (torch AdamW) in the
same report; state in host memory (hift's offloaded state) as a fraction of the same figure; and
both worked out for Llama-2-7B's shape (memory_rule.py, the report's "memory_rule").

Owns: the summary, the table, the plot, merging. May call: matplotlib.
"""
import json
import statistics
from collections import defaultdict
from typing import Dict, List, Optional

# Settings that may differ between reports that --merge combines: they are unioned (lists; the
# dicts: each method's lr grid, and the methods unavailable in one report or another).
UNIONED = ("methods", "lrs", "seeds")
UNIONED_DICTS = ("grids", "unavailable")


class ReportError(Exception):
    """Reports that cannot be combined or read."""


def stats(values: List[float]) -> dict:
    return {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2, "n": len(values)}


def _final(run, corpus: str) -> float:
    return run["evals"][-1][f"loss_{corpus}"]


def crossing_step(evals: List[dict], target: float) -> Optional[float]:
    """The first step at which held-out B loss reaches `target`, linear between evaluations;
    None if it never does."""
    previous = None
    for e in evals:
        if e["loss_B"] <= target:
            if previous is None:
                return float(e["step"])
            fraction = (previous["loss_B"] - target) / (previous["loss_B"] - e["loss_B"])
            return previous["step"] + fraction * (e["step"] - previous["step"])
        previous = e
    return None


def _forgetting(runs) -> dict:
    return stats([_final(r, "A") - r["evals"][0]["loss_A"] for r in runs])


def _grouped(runs) -> Dict[tuple, List[dict]]:
    """(method, lr, steps) -> the runs over seeds."""
    grouped = defaultdict(list)
    for run in runs:
        grouped[(run["method"], run["lr"], run["steps"])].append(run)
    return grouped


class _Reference:
    """Full fine-tuning's annealed final held-out B loss per lr and run length, and along time."""

    def __init__(self, grouped, label: Optional[str]):
        self.label = label
        self.loss = defaultdict(dict)  # lr -> steps -> stats of final B
        self.forgetting = defaultdict(dict)  # lr -> steps -> stats of final A - A before
        step_times = []
        for (method, lr, steps), runs in grouped.items():
            if method == label:
                self.loss[lr][steps] = stats([_final(r, "B") for r in runs])
                self.forgetting[lr][steps] = _forgetting(runs)
                step_times += [r["step_s"] for r in runs]
        # One step time for all full runs (their median): the frontier's time axis should not
        # carry each run's share of other work on a shared machine.
        self.step_s = statistics.median(step_times) if step_times else None

    def at_steps(self, steps: int) -> Optional[dict]:
        candidates = [(by_steps[steps]["mean"], lr) for lr, by_steps in self.loss.items() if steps in by_steps]
        if not candidates:
            return None
        loss, lr = min(candidates)
        return {"lr": lr, "steps": steps, "loss_B": loss}

    def at_seconds(self, seconds: float) -> Optional[dict]:
        """Full's best final loss for a run of `seconds`, linear between the two run lengths
        whose times bracket it; None outside the lengths that ran."""
        candidates = []
        for lr, by_steps in self.loss.items():
            points = sorted((steps * self.step_s, steps, s["mean"]) for steps, s in by_steps.items())
            for (t0, n0, l0), (t1, n1, l1) in zip(points, points[1:]):
                if t0 <= seconds <= t1:
                    candidates.append((l0 + (l1 - l0) * (seconds - t0) / (t1 - t0), lr, [n0, n1]))
                    break
        if not candidates:
            return None
        loss, lr, between = min(candidates)
        return {"lr": lr, "seconds": seconds, "loss_B": loss, "between_steps": between}


def _gap(loss: float, reference: Optional[dict]) -> Optional[float]:
    return None if reference is None else 100 * (loss / reference["loss_B"] - 1)


def _to_target(runs, target: Optional[float], step_s: float) -> Optional[dict]:
    if target is None:
        return None
    steps = [s for s in (crossing_step(r["evals"], target) for r in runs) if s is not None]
    return {"reached": len(steps), "of": len(runs), "steps": stats(steps) if steps else None,
            "seconds": stats([s * step_s for s in steps]) if steps else None}


def _memory(runs) -> Optional[dict]:
    """The largest of each byte count over `runs` (they agree but for a last byte of rounding), or
    None for runs of a report without them."""
    if any("memory" not in r for r in runs):
        return None
    return {key: max(r["memory"][key] for r in runs) for key in ("gradients", "state_device", "state_host")}


def _device(memory: Optional[dict]) -> Optional[int]:
    return None if memory is None else memory["gradients"] + memory["state_device"]


def _fractions(memory: Optional[dict], full: Optional[dict]) -> dict:
    """memory's device bytes and host bytes as fractions of full's device bytes."""
    if memory is None or not _device(full):
        return {"device": None, "host": None}
    return {"device": _device(memory) / _device(full), "host": memory["state_host"] / _device(full)}


def summarize(report: dict) -> dict:
    """The budgets, time and memory for every (method, lr) that ran the full T steps, each method
    at its best lr, and full's frontier."""
    settings = report["settings"]
    steps, kinds = settings["steps"], {r["method"]: r["kind"] for r in report["runs"]}
    grouped = _grouped(report["runs"])
    label = next((m for m in settings["methods"] if kinds.get(m) == "full"), None)
    reference = _Reference(grouped, label)
    target = reference.at_steps(settings["target_steps"])
    full_memory = _memory([r for r in report["runs"] if r["method"] == label]) if label else None
    rule = report.get("memory_rule") or {}
    rows = []
    for method in settings["methods"]:
        for (name, lr, n), runs in sorted(grouped.items()):
            if name != method or n != steps:
                continue
            k = runs[0]["groups"]
            step_s = statistics.median(r["step_s"] for r in runs)
            loss = stats([_final(r, "B") for r in runs])
            updates = k > 1 or kinds[method] == "full"  # else: every step updates all it trains
            equal = {"steps": reference.at_steps(steps),
                     "updates": reference.at_steps(max(1, round(steps / k))) if updates else None,
                     "time": reference.at_seconds(steps * step_s) if reference.step_s else None}
            memory = _memory(runs)
            rule_bytes = rule.get("methods", {}).get(method)
            rows.append({
                "method": method, "kind": kinds[method], "lr": lr, "groups": k, "step_s": step_s,
                "time_vs_full": step_s / reference.step_s if reference.step_s else None,
                "seeds": [r["seed"] for r in runs],
                "loss_B": loss, "loss_A_before": runs[0]["evals"][0]["loss_A"],
                "loss_A": stats([_final(r, "A") for r in runs]),
                "forgetting_A": _forgetting(runs),
                "equal": {budget: {"full": ref, "gap_pct": _gap(loss["mean"], ref)} for budget, ref in equal.items()},
                "to_target": _to_target(runs, target and target["loss_B"], step_s),
                "memory": memory, "memory_fraction": _fractions(memory, full_memory),
                "rule": rule_bytes, "rule_fraction": _fractions(rule_bytes, rule.get("full"))})
    best = {}
    for row in rows:
        if row["method"] not in best or row["loss_B"]["mean"] < best[row["method"]]["loss_B"]["mean"]:
            best[row["method"]] = row
    frontier = [{"lr": lr, "steps": n, "loss_B": s, "forgetting_A": reference.forgetting[lr][n],
                 "seconds": n * reference.step_s}
                for lr, by_steps in sorted(reference.loss.items()) for n, s in sorted(by_steps.items())]
    return {"reference": label, "full_step_s": reference.step_s, "target": target, "rows": rows,
            "best": [{"method": m, "lr": row["lr"]} for m, row in best.items()], "full_frontier": frontier}


def _pm(s: Optional[dict], digits=3) -> str:
    return "—" if s is None else f"{s['mean']:.{digits}f}±{s['spread']:.{digits}f}"


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:+.1f}%"


def table(report: dict) -> str:
    """The summary as text: one row per (method, lr), then full's frontier."""
    summary, settings = report["summary"], report["settings"]
    steps = settings["steps"]
    lines = [f"fidelity ({settings['preset']}, {report['environment']['device']}, {settings['clock']} clock): "
             f"fine-tuning on B for T={steps} steps, seeds {settings['seeds']}; stage 1 held-out A "
             f"{report['stage1']['heldout_A']:.3f}, B {report['stage1']['heldout_B']:.3f}",
             f"gaps: held-out B loss against {summary['reference']} at its best lr: equal steps (full T), equal "
             f"updates (full T/k), equal time (full interpolated at the method's T x step time)"
             if summary["reference"] else "no full fine-tuning runs: no gaps, no target"]
    target = summary["target"]
    if target:
        lines.append(f"target: {summary['reference']}'s final held-out B {target['loss_B']:.3f} after "
                     f"{target['steps']} steps (lr {target['lr']:g})")
    header = (f"{'method':<44} {'lr':>7} {'k':>3} {'ms/step':>8} {'B after T':>13} {'steps':>7} {'updates':>8} "
              f"{'time':>7} {'A forgetting':>13} {'to target: steps':>17} {'s':>6}")
    lines += [header, "-" * len(header)]
    for row in summary["rows"]:
        tt = row["to_target"]
        reached = "—" if tt is None else (f"{tt['steps']['mean']:.0f}" if tt["steps"] else "not reached")
        if tt and tt["steps"] and tt["reached"] < tt["of"]:
            reached += f" ({tt['reached']}/{tt['of']})"
        seconds = f"{tt['seconds']['mean']:.1f}" if tt and tt["seconds"] else "—"
        lines.append(f"{row['method']:<44} {row['lr']:>7.1e} {row['groups']:>3} {row['step_s'] * 1e3:>8.1f} "
                     f"{_pm(row['loss_B']):>13} {_pct(row['equal']['steps']['gap_pct']):>7} "
                     f"{_pct(row['equal']['updates']['gap_pct']):>8} {_pct(row['equal']['time']['gap_pct']):>7} "
                     f"{_pm(row['forgetting_A']):>13} {reached:>17} {seconds:>6}")
    lines += _best_table(report)
    if summary["full_frontier"]:
        lines.append(f"{summary['reference']} by run length (the budgets' references), "
                     f"{summary['full_step_s'] * 1e3:.1f} ms/step:")
        lines += [f"  lr {p['lr']:.1e} {p['steps']:>6} steps {p['seconds']:>8.1f} s  held-out B {_pm(p['loss_B'])}"
                  f"  A forgetting {_pm(p['forgetting_A'])}" for p in summary["full_frontier"]]
    return "\n".join(lines)


def best_rows(summary: dict) -> List[dict]:
    """The summary's row of each method at its best lr, in the report's method order."""
    best = {(b["method"], b["lr"]) for b in summary.get("best", [])}
    return [row for row in summary["rows"] if (row["method"], row["lr"]) in best]


def _fraction(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.3f}"


def _best_table(report: dict) -> List[str]:
    """Each method at its best lr: quality, time and memory side by side."""
    summary, settings = report["summary"], report["settings"]
    rows = best_rows(summary)
    if not rows:
        return []
    grids = settings.get("grids", {})
    lines = [f"each method at its best lr (lowest mean held-out B after T over its grid; grids: "
             + "; ".join(f"{m} {'/'.join(f'{lr:g}' for lr in grid)}" for m, grid in grids.items())
             + f"; seeds {settings['seeds']}); time: its step time / {summary['reference']}'s; memory: gradients + "
             f"optimizer state on the device at a step's peak, counted from the tensors, / {summary['reference']}'s; "
             f"host: state in host memory / the same; 7B: the same rule for Llama-2-7B's shape"]
    header = (f"{'method':<28} {'lr':>7} {'k':>3} {'time':>6} {'B after T':>13} {'steps':>7} {'time':>7} "
              f"{'A forgetting':>13} {'to target':>11} {'memory':>7} {'host':>6} {'7B mem':>7} {'7B host':>7}")
    lines += [header, "-" * len(header)]
    for row in rows:
        tt = row["to_target"]
        reached = "—" if tt is None else (f"{tt['steps']['mean']:.0f}" if tt["steps"] else "no")
        if tt and tt["steps"] and tt["reached"] < tt["of"]:
            reached += f" ({tt['reached']}/{tt['of']})"
        time_ratio = "—" if row["time_vs_full"] is None else f"{row['time_vs_full']:.2f}"
        memory, rule = row["memory_fraction"], row["rule_fraction"]
        lines.append(f"{row['method']:<28} {row['lr']:>7.1e} {row['groups']:>3} {time_ratio:>6} "
                     f"{_pm(row['loss_B']):>13} {_pct(row['equal']['steps']['gap_pct']):>7} "
                     f"{_pct(row['equal']['time']['gap_pct']):>7} {_pm(row['forgetting_A']):>13} {reached:>11} "
                     f"{_fraction(memory['device']):>7} {_fraction(memory['host']):>6} "
                     f"{_fraction(rule['device']):>7} {_fraction(rule['host']):>7}")
    for label, why in settings.get("unavailable", {}).items():
        lines.append(f"{label:<28} unavailable: {why}")
    return lines


def _mean_curve(runs, key: str):
    """(steps, mean of `key` over the runs at each evaluation)."""
    steps = [e["step"] for e in runs[0]["evals"]]
    return steps, [statistics.fmean(r["evals"][i][key] for r in runs) for i in range(len(steps))]


def plot(report: dict, path: str) -> None:
    """Held-out B against steps, against seconds and against memory (the device figure of the
    memory rule, a line on to device + host where a method keeps state in host memory), held-out A
    against steps: each method at its best lr (lowest mean final B after T steps), mean over
    seeds; full's run lengths as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, grouped = report["summary"], _grouped(report["runs"])
    fig, (by_step, by_time, by_memory, forgetting) = plt.subplots(1, 4, figsize=(24, 5.5))
    for i, row in enumerate(best_rows(summary)):
        method = row["method"]
        runs = grouped[(method, row["lr"], report["settings"]["steps"])]
        steps, loss_b = _mean_curve(runs, "loss_B")
        style = {"label": f"{method} lr={row['lr']:g}", "color": plt.cm.tab20((2 * i) % 20 + (i // 10) % 2)}
        by_step.plot(steps, loss_b, **style)
        by_time.plot([s * row["step_s"] for s in steps], loss_b, **style)
        forgetting.plot(*_mean_curve(runs, "loss_A"), **style)
        memory = row["memory_fraction"]
        if memory["device"] is not None:
            by_memory.plot([memory["device"]], [row["loss_B"]["mean"]], "o", color=style["color"])
            by_memory.annotate(method, (memory["device"], row["loss_B"]["mean"]), fontsize=6,
                               xytext=(3, 3), textcoords="offset points")
            if memory["host"]:
                by_memory.plot([memory["device"], memory["device"] + memory["host"]], [row["loss_B"]["mean"]] * 2,
                               ":", color=style["color"])
    best_by_length = {}
    for point in summary["full_frontier"]:
        known = best_by_length.get(point["steps"])
        if known is None or point["loss_B"]["mean"] < known["loss_B"]["mean"]:
            best_by_length[point["steps"]] = point
    if best_by_length:
        points = sorted(best_by_length.values(), key=lambda p: p["steps"])
        for axis, x in ((by_step, "steps"), (by_time, "seconds")):
            axis.plot([p[x] for p in points], [p["loss_B"]["mean"] for p in points], "ko",
                      label=f"{summary['reference']}: final loss of a run of that length, best lr")
    by_step.set(xlabel="optimizer steps", ylabel="held-out loss on B (fine-tuning domain)")
    by_time.set(xlabel="seconds (steps x step time)", ylabel="held-out loss on B")
    by_memory.set(xlabel=f"gradients + optimizer state on the device / {summary['reference']}'s "
                         "(dotted: + state in host memory)", ylabel="held-out loss on B after T steps")
    forgetting.set(xlabel="optimizer steps", ylabel="held-out loss on A (pretraining domain)")
    for axis in (by_step, by_time, by_memory, forgetting):
        axis.grid(alpha=0.3)
    fig.suptitle(f"fidelity ({report['settings']['preset']}, {report['environment']['device']})")
    fig.tight_layout()
    fig.legend(*by_step.get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def merge(paths: List[str]) -> dict:
    """One report with the runs of all `paths`, which must share everything but UNIONED settings."""
    reports = []
    for path in paths:
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as exc:
            raise ReportError(f"--merge {path}: {exc}") from None
        if reports[-1].get("benchmark") != "fidelity":
            raise ReportError(f"--merge {path}: not a fidelity report")
    first = reports[0]

    def fixed(report):
        return ({k: v for k, v in report["settings"].items() if k not in UNIONED + UNIONED_DICTS},
                report["stage1"]["key"], report["corpora"]["A"]["sha256"], report["corpora"]["B"]["sha256"])

    settings = {k: list(v) if k in UNIONED else dict(v) if k in UNIONED_DICTS else v
                for k, v in first["settings"].items()}
    merged = {**first, "settings": settings, "runs": [], "merged_from": list(paths)}
    if "memory_rule" in first:
        merged["memory_rule"] = {**first["memory_rule"], "methods": {}}
    seen = set()
    for path, report in zip(paths, reports):
        if fixed(report) != fixed(first):
            raise ReportError(f"--merge {path}: its settings, stage 1 checkpoint or corpora differ from {paths[0]}'s")
        for key in UNIONED:
            merged["settings"][key] += [v for v in report["settings"][key] if v not in merged["settings"][key]]
        grids = merged["settings"].setdefault("grids", {})
        for label, grid in report["settings"].get("grids", {}).items():
            grids[label] = sorted(set(grids.get(label, [])) | set(grid))
        merged["settings"].setdefault("unavailable", {}).update(report["settings"].get("unavailable", {}))
        if "memory_rule" in merged:
            merged["memory_rule"]["methods"].update(report.get("memory_rule", {}).get("methods", {}))
        for run in report["runs"]:
            identity = (run["method"], run["lr"], run["seed"], run["steps"])
            if identity in seen:
                raise ReportError(f"--merge {path}: run {identity} is in two reports")
            seen.add(identity)
            merged["runs"].append(run)
    for label in merged["settings"]["methods"]:  # ran in one report, unavailable in another
        merged["settings"].get("unavailable", {}).pop(label, None)
    return merged
