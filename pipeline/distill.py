"""Stage 3: distil the student from the frozen teacher with the chosen KD method, fixed or
spot-adaptive spots, and all samples or SAKD's selection."""

from __future__ import annotations

from kdcompress.common import distributed
from kdcompress.training.student import distill
from models import create_model
from pipeline._common import setup, stage


@stage
def main(argv=None):
    args, params = setup(argv, "distill", data="artifacts/data", teacher="artifacts/teacher/teacher.pt",
                         out="artifacts/student/student.pt", resume="artifacts/resume/distill.pt",
                         metrics="artifacts/metrics/distill.json", plots="artifacts/plots/distill_history.csv",
                         rounds="artifacts/plots/selection_rounds.csv", routing="artifacts/plots/spot_routing.csv")
    if distributed.wanted(params["base"]):  # several processes: this one starts and waits for them
        return distributed.launch("pipeline.distill", argv, params["base"])
    summary = distill(params, args, create_model)
    if summary is not None:
        cfg = params["distill"]
        print(f"student {cfg.student} ({cfg.method}, {cfg.sampling}): val_acc {summary['val_acc']:.4f} "
              f"({summary['train_seconds']:.0f}s) -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
