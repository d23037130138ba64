"""Compare and choose: every benchmarked student run of the MLflow store as points on the
accuracy-latency plane (fp32 and int8, teachers beside them), the Pareto front, the seed notebook's
rank table, and the best student under a latency / size budget."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kdcompress.metrics import rank_table

RANKED = {"top1": "max", "nll": "min", "ece": "min", "agreement": "max", "kl_teacher_student": "min",
          "logit_cosine": "max", "entropy": "min"}


@dataclass
class Point:
    name: str  # the run (students) or the teacher's architecture
    role: str  # student | teacher
    precision: str  # fp32 | int8
    top1: float  # test top-1 of the ONNX model
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
    """Students (fp32, int8) of every run that has benchmark figures; each teacher once (the latest
    run's measurement of it), told apart by its checkpoint hash where the run recorded one."""
    out, teachers = [], {}
    for run in runs:
        m = run["metrics"]
        if "benchmark.student.fp32.ort_edge.p50_ms" not in m or "quantize.student.fp32_top1" not in m:
            continue
        for role in ("student", "teacher"):
            for precision in ("fp32", "int8"):
                bench = f"benchmark.{role}.{precision}"
                point = Point(
                    name=run_label(run) if role == "student" else run["tags"].get("kdcompress.teacher", "teacher"),
                    role=role, precision=precision, top1=m[f"quantize.{role}.{precision}_top1"],
                    p50_ms=m[f"{bench}.ort_edge.p50_ms"], size_kib=m[f"{bench}.file_bytes"] / 1024,
                    shippable=precision == "fp32" or bool(m.get(f"quantize.{role}.passed")), run_id=run["run_id"])
                point.shipped = run["tags"].get("kdcompress.shipped", precision) == precision and point.shippable
                if role == "student":
                    out.append(point)
                else:
                    key = (run["tags"].get("kdcompress.teacher_sha") or f"{point.top1:.4f}", precision)
                    if key not in teachers or run["start_time"] > teachers[key][0]:
                        teachers[key] = (run["start_time"], point)
    return out + [p for _, p in teachers.values()]


def mark_front(pts: list[Point]) -> list[Point]:
    """Mark the Pareto front among the shippable points: none other is at least as fast and at
    least as accurate, and strictly better in one of the two."""
    candidates = [p for p in pts if p.shippable]
    for p in pts:
        p.on_front = p.shippable and not any(
            q is not p and q.p50_ms <= p.p50_ms and q.top1 >= p.top1 and (q.p50_ms < p.p50_ms or q.top1 > p.top1)
            for q in candidates)
    return pts


def best_under(pts: list[Point], max_latency_ms: float | None, max_size_kib: float | None) -> Point | None:
    """The most accurate student within the budget, each run as its ship stage shipped it (int8 only
    where it passed the gate and was faster; ties: the faster one); None if none fits."""
    fits = [p for p in pts if p.role == "student" and p.shipped
            and (max_latency_ms is None or p.p50_ms <= max_latency_ms)
            and (max_size_kib is None or p.size_kib <= max_size_kib)]
    return max(fits, key=lambda p: (p.top1, -p.p50_ms), default=None)


def ranks(runs: list[dict]) -> list[dict]:
    """The seed notebook's rank table over every evaluated student run (fp32 test metrics), best first."""
    rows = {run_label(r): {k: r["metrics"].get(f"test.{k}") for k in RANKED} for r in runs
            if "test.top1" in r["metrics"]}
    table = rank_table(rows, RANKED)
    out = [{"run": name, **rows[name], **table[name]} for name in rows]
    return sorted(out, key=lambda r: (r["avg_rank"] is None, r["avg_rank"]))


def plot(pts: list[Point]):
    """Accuracy against batch-1 latency (log scale), students and teachers, fp32 and int8, front joined."""
    from kdcompress.figures import matplotlib, plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    style = {("student", "fp32"): ("o", "tab:blue"), ("student", "int8"): ("s", "tab:cyan"),
             ("teacher", "fp32"): ("^", "tab:red"), ("teacher", "int8"): ("v", "tab:orange")}
    for (role, precision), (marker, colour) in style.items():
        group = [p for p in pts if (p.role, p.precision) == (role, precision)]
        if group:
            ax.scatter([p.p50_ms for p in group], [100 * p.top1 for p in group], marker=marker, color=colour,
                       facecolors=[colour if p.shippable else "none" for p in group], label=f"{role} {precision}")
    front = sorted((p for p in pts if p.on_front), key=lambda p: p.p50_ms)
    ax.plot([p.p50_ms for p in front], [100 * p.top1 for p in front], color="black", linewidth=1, label="Pareto front")
    for p in front:
        ax.annotate(f"{p.name.split(' #')[0]} {p.precision}", (p.p50_ms, 100 * p.top1), fontsize=7,
                    xytext=(4, -10), textcoords="offset points")
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set(xlabel="onnxruntime batch-1 p50 latency, 1 thread (ms, log scale)", ylabel="test top-1 (%)",
           title="Accuracy vs latency (hollow: int8 that failed the gate)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig
