"""Compare and choose, over every student run in the MLflow store:

    python -m pipeline.leaderboard [--target-latency-ms X] [--max-size-kb Y] [--out artifacts/leaderboard]

writes the rank table (ranks.md, ranks.csv), the accuracy-latency plot with its Pareto front
(pareto.png, and pareto.csv for `dvc plots show`) and the best student under the budget (best.json),
and logs them to MLflow as a run of their own (role `leaderboard`)."""

from __future__ import annotations

from pathlib import Path

from kdcompress import leaderboard, tracking
from kdcompress.io import atomic_write, write_csv, write_json
from kdcompress.types import UserError
from pipeline._common import parser, stage

COLUMNS = ["run", "top1", "nll", "ece", "agreement", "kl_teacher_student", "logit_cosine", "entropy", "avg_rank"]


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns),
                      *("| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows)]) + "\n"


@stage
def main(argv=None):
    p = parser("leaderboard", out="artifacts/leaderboard")
    p.add_argument("--target-latency-ms", type=float, default=None, help="batch-1 p50 budget (onnxruntime, 1 thread)")
    p.add_argument("--max-size-kb", type=float, default=None, help="model file budget in KiB")
    args = p.parse_args(argv)
    for flag, value in (("--target-latency-ms", args.target_latency_ms), ("--max-size-kb", args.max_size_kb)):
        if value is not None and not 0 < value < float("inf"):
            raise UserError(f"{flag}: {value:g} is out of range; allowed: a positive number")
    runs = tracking.runs("student")
    pts = leaderboard.mark_front(leaderboard.points(runs))
    if not any(pt.role == "student" for pt in pts):
        raise UserError(f"no benchmarked student run in the MLflow store {tracking.tracking_uri()}; "
                        "run `dvc repro` (or `dvc exp run`) first")
    out = Path(args.out)
    ranks = leaderboard.ranks(runs)
    atomic_write(out / "ranks.md", markdown(ranks, COLUMNS + [c for c in ranks[0] if c.endswith("_rank")
                                                              and c != "avg_rank"]), text=True)
    write_csv(out / "ranks.csv", ranks)
    write_csv(out / "pareto.csv", [pt.row() for pt in sorted(pts, key=lambda pt: pt.p50_ms)])
    best = leaderboard.best_under(pts, args.target_latency_ms, args.max_size_kb)
    budget = {"target_latency_ms": args.target_latency_ms, "max_size_kib": args.max_size_kb}
    write_json(out / "best.json", {"budget": budget, "best": best.row() if best else None})
    fig = leaderboard.plot(pts)
    with tracking.start_run("leaderboard", "leaderboard"):
        tracking.log_params({"leaderboard": {**budget, "runs": len(runs)}})
        tracking.log_figure(fig, "pareto.png", out / "pareto.png")
        for name in ("ranks.md", "ranks.csv", "pareto.csv", "best.json"):
            tracking.log_artifact(out / name)
        if best:
            tracking.log_metrics({"best": {"top1": best.top1, "p50_ms": best.p50_ms, "size_kib": best.size_kib}})
            tracking.log_tags({"kdcompress.best": f"{best.name} {best.precision}", "kdcompress.best_run": best.run_id})
    front = sorted((pt for pt in pts if pt.on_front), key=lambda pt: pt.p50_ms)
    print(f"{sum(pt.role == 'student' for pt in pts)} student points from {len(runs)} runs; Pareto front:")
    for pt in front:
        print(f"  {pt.role:7s} {pt.precision}  top-1 {pt.top1:.2%}  p50 {pt.p50_ms:.4f} ms  {pt.size_kib:.1f} KiB  "
              f"{pt.name}")
    limits = ", ".join(f"{k} {v:g}" for k, v in budget.items() if v is not None) or "no budget"
    if best:
        print(f"best student under {limits}: {best.name} {best.precision} (top-1 {best.top1:.2%}, "
              f"p50 {best.p50_ms:.4f} ms, {best.size_kib:.1f} KiB)")
    else:
        shippable = [pt for pt in pts if pt.role == "student" and pt.shipped]
        print(f"no student fits {limits}: the fastest is {min(pt.p50_ms for pt in shippable):.4f} ms, "
              f"the smallest {min(pt.size_kib for pt in shippable):.1f} KiB")
    print(f"written to {out}")


if __name__ == "__main__":
    raise SystemExit(main())
