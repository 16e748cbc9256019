"""Does the collapse guard stay quiet on healthy runs and speak on degenerating ones?

Replays the per-step training losses that benchmarks.staleness records (each run's "loss") through the guard's
rules (hf_contaccum.core.diagnostics.TrainingDiagnostics, patience 10 as by default). The guard reads each step's
mean of loss / log(candidates); a run's file gives its layout, so each micro-batch's candidates are known (the
bank fills by N_local pairs a micro-batch); a step's ratio is taken as its mean loss over the mean log of its
micro-batches' candidates. The spread rule (every vector the same) needs vectors, not losses: it is left out.

    python -m benchmarks.collapse_guard            # every results file with loss curves
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os

from benchmarks.staleness import diagnostics, methods

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEGENERATE = ("query-bank", "passage-only")  # the diagnostics: a bank whose passages outnumber its banked queries


def step_ratios(losses: list[float], layout: tuple, steps: int) -> list[float]:
    per_device, k, _, passage_bank = layout[:4]
    ratios = []
    for step, loss in enumerate(losses):
        uniform = [math.log(per_device + min((step * k + j) * per_device, passage_bank)) for j in range(k)]
        ratios.append(loss / (sum(uniform) / k))
    return ratios


def replay(ratios: list[float], reads_bank: bool, patience: int = 10) -> dict:
    from hf_contaccum.core.diagnostics import (
        EmbeddingCollapseError,
        TrainingDiagnostics,
    )

    guard, warned_at = TrainingDiagnostics(), None
    for step, ratio in enumerate(ratios, 1):
        guard._window = {"micro_batches": 1, "spread": 0.5, "loss_ratio": ratio, "bank_read": int(reads_bank)}
        try:
            guard.check_collapse(patience)
        except EmbeddingCollapseError as stop:
            return {"warned_at_step": warned_at or step, "stopped_at_step": step, "why": str(stop)[:160]}
        if guard._warned_rise and warned_at is None:
            warned_at = step
    rise = (guard._smoothed or 0) - guard._lowest_smoothed
    return {"warned_at_step": warned_at, "stopped_at_step": None, "final_rise": rise}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", default=None, help="results files (default: every one with losses)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "collapse_guard", "replay.json"))
    args = parser.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(RESULTS, "**", "*.json"), recursive=True))
    rows = []
    for path in files:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict) or "runs" not in saved or "n_total" not in saved:
            continue
        n_total, factor = saved["n_total"], saved["bank"] // saved["n_total"]
        layouts = {**methods(n_total, factor, saved["steps"]), **diagnostics(n_total, factor)}
        for run in saved["runs"]:
            if not run.get("loss") or run["method"] not in layouts:
                continue
            layout = layouts[run["method"]]
            ratios = step_ratios(run["loss"], layout, saved["steps"])
            outcome = replay(ratios, reads_bank=layout[3] > 0)
            rows.append({"file": os.path.relpath(path, RESULTS), "method": run["method"], "seed": run["seed"],
                         "degenerate": any(word in run["method"] for word in DEGENERATE),
                         "ndcg@10": run["ndcg@10"], "pretrained_ndcg@10": saved["pretrained"]["ndcg@10"],
                         "lowest_ratio": min(ratios), "last_ratio": ratios[-1], **outcome})
    healthy = [r for r in rows if not r["degenerate"]]
    summary = {"healthy_runs": len(healthy), "healthy_warned": sum(r["warned_at_step"] is not None for r in healthy),
               "healthy_stopped": sum(r["stopped_at_step"] is not None for r in healthy),
               "degenerate_runs": len(rows) - len(healthy),
               "degenerate_warned": sum(r["warned_at_step"] is not None for r in rows if r["degenerate"]),
               "degenerate_stopped": sum(r["stopped_at_step"] is not None for r in rows if r["degenerate"])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "runs": rows}, f, indent=1)
    print(json.dumps(summary))
    for r in rows:
        print(f"{r['file']:<45}{r['method']:<40}{r['seed']:>3}{r['ndcg@10']:>8.4f}  lowest {r['lowest_ratio']:.3f} "
              f"last {r['last_ratio']:.3f}  warned {r['warned_at_step']}  stopped {r['stopped_at_step']}")
    return summary


if __name__ == "__main__":
    main()
