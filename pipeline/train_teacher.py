"""Stage 2: train the teacher (best checkpoint on val), or load the user's own weights from
``teacher.checkpoint``."""

from __future__ import annotations

from kdcompress.common import distributed
from kdcompress.training.teacher import train_teacher
from models import create_model
from pipeline._common import setup, stage


@stage
def main(argv=None):
    args, params = setup(argv, "train_teacher", data="artifacts/data", out="artifacts/teacher/teacher.pt",
                         resume="artifacts/resume/train_teacher.pt", metrics="artifacts/metrics/teacher.json",
                         plots="artifacts/plots/teacher_history.csv")
    if distributed.wanted(params["base"]):  # several processes: this one starts and waits for them
        return distributed.launch("pipeline.train_teacher", argv, params["base"])
    summary = train_teacher(params, args, create_model)
    if summary is not None:
        print(f"teacher {params['teacher'].model}: val_acc {summary['val_acc']:.4f} "
              f"({summary['train_seconds']:.0f}s) -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
