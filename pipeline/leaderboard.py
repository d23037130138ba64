"""Compare and choose, over every student run in the MLflow store:

    python -m pipeline.leaderboard [--target-latency-ms X] [--max-size-kb Y] [--out artifacts/leaderboard]

writes the rank table (ranks.md, ranks.csv; test metrics, reported), the accuracy-latency plot with its
Pareto front (pareto.png, and pareto.csv for `dvc plots show`) and the best student under the budget
(best.json), and logs them to MLflow as a run of their own (role `leaderboard`). The front and the pick
are made on val top-1; test top-1 is given beside it, labelled test."""

from __future__ import annotations

from pathlib import Path

from kdcompress.common import tracking
from kdcompress.io import atomic_write, write_csv, write_json
from kdcompress.report import figures, leaderboard
from kdcompress.types import UserError
from pipeline._common import parser, stage


@stage
def main(argv=None):
    p = parser("leaderboard", params=False, out="artifacts/leaderboard")
    p.add_argument("--target-latency-ms", type=float, default=None, help="batch-1 p50 budget (onnxruntime, 1 thread)")
    p.add_argument("--max-size-kb", type=float, default=None, help="model file budget in KiB")
    args = p.parse_args(argv)
    for flag, value in (("--target-latency-ms", args.target_latency_ms), ("--max-size-kb", args.max_size_kb)):
        if value is not None and not 0 < value < float("inf"):
            raise UserError(f"{flag}: {value:g} is out of range; allowed: a positive number")
    runs = tracking.runs("student")
    pts = leaderboard.mark_front(leaderboard.points(runs))
    if not any(pt.role == "student" for pt in pts):
        raise UserError(f"no benchmarked student run (with the quantize stage's val figures) in the MLflow store "
                        f"{tracking.tracking_uri()}; run `dvc repro` (or `dvc exp run`) first")
    out = Path(args.out)
    ranks = leaderboard.ranks(runs)
    atomic_write(out / "ranks.md", leaderboard.markdown(ranks), text=True)
    write_csv(out / "ranks.csv", ranks)
    write_csv(out / "pareto.csv", [pt.row() for pt in sorted(pts, key=lambda pt: pt.p50_ms)])
    best = leaderboard.best_under(pts, args.target_latency_ms, args.max_size_kb)
    budget = {"target_latency_ms": args.target_latency_ms, "max_size_kib": args.max_size_kb}
    write_json(out / "best.json", {"budget": budget, "best": best.row() if best else None})
    fig = figures.pareto(pts)
    with tracking.start_run("leaderboard", "leaderboard"):
        tracking.log_params({"leaderboard": {**budget, "runs": len(runs)}})
        tracking.log_figure(fig, "pareto.png", out / "pareto.png")
        for name in ("ranks.md", "ranks.csv", "pareto.csv", "best.json"):
            tracking.log_artifact(out / name)
        if best:
            tracking.log_metrics({"best": {"val": {"top1": best.val_top1}, "test": {"top1": best.test_top1},
                                           "p50_ms": best.p50_ms, "size_kib": best.size_kib}})
            tracking.log_tags({"kdcompress.best": f"{best.name} {best.precision}", "kdcompress.best_run": best.run_id})
    print("\n".join(leaderboard.report(pts, best, budget, len(runs))))
    print(f"written to {out}")


if __name__ == "__main__":
    raise SystemExit(main())
