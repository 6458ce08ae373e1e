"""What a job reports: the summary table, the loss at equal time when methods are compared, the
plot (matplotlib) and the JSON figures, each file written beside its target and then renamed
over it.

Owns: LOSS_WINDOW, add_equal_time, summary_table, plot, report. May call: matplotlib,
hift_rt.job.errors.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import statistics
from pathlib import Path
from typing import List

from .errors import JobError

LOSS_WINDOW = 10  # steps averaged for the "final loss" and the equal-time loss


def add_equal_time(results: List[dict]) -> None:
    """Give each result `equal_time` = {"seconds", "steps", "loss"}: its training loss (mean over
    its last LOSS_WINDOW steps) when it had trained as many seconds as the shortest whole run
    (the sum of that run's step times). The loss per step flatters the method that makes more
    progress per step however long its steps take; this compares equal wall time."""
    seconds = min(sum(r["step_seconds"]) for r in results)
    for r in results:
        elapsed, n = 0.0, 0
        for s in r["step_seconds"]:
            if elapsed + s > seconds * (1 + 1e-9):  # the shortest run itself reaches its last step
                break
            elapsed, n = elapsed + s, n + 1
        loss = statistics.fmean(r["losses"][max(0, n - LOSS_WINDOW):n]) if n else float("nan")
        r["equal_time"] = {"seconds": seconds, "steps": n, "loss": loss}


def summary_table(results: List[dict]) -> str:
    rows = [("", *[r["method"] for r in results]),
            ("groups", *[str(r["groups"]) for r in results]),
            ("peak GPU memory (GiB)", *[("-" if math.isnan(r["peak_GiB"]) else f"{r['peak_GiB']:.2f}") for r in results]),
            ("step time (s, median)", *[f"{r['step_s']:.4f}" for r in results]),
            ("tokens/s", *[f"{r['tokens_per_s']:.0f}" for r in results]),
            ("first loss", *[f"{r['first_loss']:.3f}" for r in results]),
            (f"final loss (last {LOSS_WINDOW})", *[f"{r['final_loss']:.3f}" for r in results]),
            ("held-out loss start -> end", *[f"{r['heldout_start']:.3f} -> {r['heldout_end']:.3f}" for r in results])]
    if "equal_time" in results[0]:
        rows.append((f"loss at equal time ({results[0]['equal_time']['seconds']:.1f} s)",
                     *[f"{r['equal_time']['loss']:.3f} @ step {r['equal_time']['steps']}" for r in results]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(row[i]) for row in rows) for i in range(1, len(rows[0]))]
    return "\n".join(f"{row[0]:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(row[1:], cols)) for row in rows)


def plot(results: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_memory = any(not math.isnan(m) for r in results for m in r["memory_GiB"])
    fig, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(11 if has_memory else 6, 4), squeeze=False)
    for r in results:
        axes[0][0].plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["method"], linewidth=1)
        if has_memory:
            axes[0][1].plot(range(1, len(r["memory_GiB"]) + 1), r["memory_GiB"], label=r["method"])
    axes[0][0].set_xlabel("step")
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend()
    if has_memory:
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("peak GPU memory so far (GiB)")
        axes[0][1].legend()
    fig.tight_layout()
    _write_replacing(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"))
    plt.close(fig)


def _write_replacing(path: str, write) -> None:
    """`write(tmp)` into a file beside `path`, then replace `path` with it."""
    target = Path(path)
    tmp = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{target.suffix}"
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def report(args, results: List[dict]) -> None:
    """The summary table, and the plot and JSON when asked for."""
    if args.model is None and not args.resume:
        print("note: the model started from random weights (no --model given); the loss shows it learning the text")
    if len(results) > 1:
        add_equal_time(results)
    print(summary_table(results))
    if len(results) > 1:
        print("loss at equal time: the training loss each method had reached after as many seconds as the "
              "shortest whole run took; compare methods by this, not by the loss per step")
    try:
        if args.plot:
            plot(results, args.plot)
            print(f"plot: {args.plot}")
        if args.json:
            _write_replacing(args.json, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    except OSError as exc:
        raise JobError(f"cannot write the results: {exc}") from None
