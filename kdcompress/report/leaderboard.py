"""Compare and choose: every benchmarked student run of the MLflow store as points on the
accuracy-latency plane (fp32 and int8, teachers beside them), the Pareto front, the average-rank
table, and the best student under a latency / size budget. The front and the pick are made on val
top-1; test top-1 is carried beside it, only reported."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kdcompress.report.metrics import rank_table

RANKED = {"top1": "max", "nll": "min", "ece": "min", "agreement": "max", "kl_teacher_student": "min",
          "logit_cosine": "max", "entropy": "min"}


@dataclass
class Point:
    name: str  # the run (students) or the teacher's architecture
    role: str  # student | teacher
    precision: str  # fp32 | int8
    val_top1: float  # val top-1 of the ONNX model: what the front and the pick are decided on
    test_top1: float  # test top-1 of the ONNX model: reported only
    p50_ms: float  # onnxruntime, batch 1, 1 thread
    size_kib: float
    shippable: bool  # int8 only where it passed the accuracy gate
    run_id: str
    shipped: bool = True  # what the run's ship stage chose (int8 only if it also was faster)
    on_front: bool = False

    def row(self) -> dict:
        return asdict(self)


def run_label(run: dict) -> str:
    tags = run["tags"]
    label = f"{tags.get('kdcompress.student', '?')} {tags.get('kdcompress.method', '?')}"
    sampling = tags.get("kdcompress.sampling", "full")
    return f"{label}{'' if sampling == 'full' else ' ' + sampling} #{run['run_id'][:6]}"


def points(runs: list[dict]) -> list[Point]:
    """Students (fp32, int8) of every run that has benchmark figures and the quantize stage's val and
    test top-1; each teacher once (the latest run's measurement of it), told apart by its checkpoint
    hash where the run recorded one."""
    out, teachers = [], {}
    for run in runs:
        m = run["metrics"]
        if "benchmark.student.fp32.ort_edge.p50_ms" not in m or "quantize.student.val.fp32_top1" not in m:
            continue
        for role in ("student", "teacher"):
            for precision in ("fp32", "int8"):
                bench = f"benchmark.{role}.{precision}"
                point = Point(
                    name=run_label(run) if role == "student" else run["tags"].get("kdcompress.teacher", "teacher"),
                    role=role, precision=precision, val_top1=m[f"quantize.{role}.val.{precision}_top1"],
                    test_top1=m[f"quantize.{role}.test.{precision}_top1"],
                    p50_ms=m[f"{bench}.ort_edge.p50_ms"], size_kib=m[f"{bench}.file_bytes"] / 1024,
                    shippable=precision == "fp32" or bool(m.get(f"quantize.{role}.passed")), run_id=run["run_id"])
                point.shipped = run["tags"].get("kdcompress.shipped", precision) == precision and point.shippable
                if role == "student":
                    out.append(point)
                else:
                    key = (run["tags"].get("kdcompress.teacher_sha") or f"{point.val_top1:.4f}", precision)
                    if key not in teachers or run["start_time"] > teachers[key][0]:
                        teachers[key] = (run["start_time"], point)
    return out + [p for _, p in teachers.values()]


def mark_front(pts: list[Point]) -> list[Point]:
    """Mark the Pareto front among the shippable points: none other is at least as fast and at
    least as accurate on val, and strictly better in one of the two."""
    candidates = [p for p in pts if p.shippable]
    for p in pts:
        p.on_front = p.shippable and not any(
            q is not p and q.p50_ms <= p.p50_ms and q.val_top1 >= p.val_top1
            and (q.p50_ms < p.p50_ms or q.val_top1 > p.val_top1)
            for q in candidates)
    return pts


def best_under(pts: list[Point], max_latency_ms: float | None, max_size_kib: float | None) -> Point | None:
    """The student with the highest val top-1 within the budget, each run as its ship stage shipped it
    (int8 only where it passed the gate and was faster; ties: the faster one); None if none fits."""
    fits = [p for p in pts if p.role == "student" and p.shipped
            and (max_latency_ms is None or p.p50_ms <= max_latency_ms)
            and (max_size_kib is None or p.size_kib <= max_size_kib)]
    return max(fits, key=lambda p: (p.val_top1, -p.p50_ms), default=None)


def ranks(runs: list[dict]) -> list[dict]:
    """The average-rank table over every evaluated student run (fp32 test metrics, reported: nothing is
    chosen from it), best first."""
    rows = {run_label(r): {k: r["metrics"].get(f"test.{k}") for k in RANKED} for r in runs
            if "test.top1" in r["metrics"]}
    table = rank_table(rows, RANKED)
    out = [{"run": name, **rows[name], **table[name]} for name in rows]
    return sorted(out, key=lambda r: (r["avg_rank"] is None, r["avg_rank"]))



COLUMNS = ["run", "top1", "nll", "ece", "agreement", "kl_teacher_student", "logit_cosine", "entropy", "avg_rank"]


def markdown(ranked: list[dict]) -> str:
    """The rank table as markdown: the metrics, their average rank, then each metric's rank."""
    columns = COLUMNS + [c for c in ranked[0] if c.endswith("_rank") and c != "avg_rank"]

    def cell(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns),
                      *("| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in ranked)]) + "\n"


def report(pts: list[Point], best: Point | None, budget: dict, runs: int) -> list[str]:
    """What the leaderboard prints: the Pareto front, then the best student under the budget."""
    lines = []
    front = sorted((pt for pt in pts if pt.on_front), key=lambda pt: pt.p50_ms)
    lines.append(f"{sum(pt.role == 'student' for pt in pts)} student points from {runs} runs; Pareto front:")
    for pt in front:
        lines.append(f"  {pt.role:7s} {pt.precision}  val top-1 {pt.val_top1:.2%} (test {pt.test_top1:.2%})  "
                     f"p50 {pt.p50_ms:.4f} ms  {pt.size_kib:.1f} KiB  {pt.name}")
    limits = ", ".join(f"{k} {v:g}" for k, v in budget.items() if v is not None) or "no budget"
    if best:
        lines.append(f"best student under {limits}, by val top-1: {best.name} {best.precision} (val top-1 "
                     f"{best.val_top1:.2%}, test top-1 {best.test_top1:.2%} reported, p50 {best.p50_ms:.4f} ms, "
                     f"{best.size_kib:.1f} KiB)")
    else:
        shippable = [pt for pt in pts if pt.role == "student" and pt.shipped]
        lines.append(f"no student fits {limits}: the fastest is {min(pt.p50_ms for pt in shippable):.4f} ms, "
                     f"the smallest {min(pt.size_kib for pt in shippable):.1f} KiB")
    return lines
