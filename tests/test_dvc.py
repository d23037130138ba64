"""The real DVC pipeline in a temp git repo on tiny data: repro, a no-op second repro,
metrics/params/plots commands and an experiment with -S."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_fashion_idx, write_params

pytestmark = [pytest.mark.skipif(shutil.which("git") is None, reason="needs git"), pytest.mark.slow]


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_dvc_repro_noop_metrics_and_experiment(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "pipeline", "kdcompress", "models", "weights"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    for cache in repo.rglob("__pycache__"):
        shutil.rmtree(cache)
    write_fashion_idx(repo / "data")
    write_params(repo, data={"dataset": "fashion_mnist", "root": "data", "val_fraction": 0.2, "download": False})
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(repo),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    dvc = [str(Path(bin_dir) / "dvc")]
    run(["git", "init", "-q"], repo, env)
    run(dvc + ["init", "-q"], repo, env)
    run(dvc + ["config", "core.analytics", "false"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "init"], repo, env)

    out = run(dvc + ["repro"], repo, env)
    assert "Running stage 'ship'" in out and (repo / "artifacts/ship/model.onnx").exists()
    assert (repo / "mlflow.db").exists()  # the store lives in the project root (DVC_ROOT)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "run"], repo, env)

    again = run(dvc + ["repro"], repo, env)
    assert "Running stage" not in again and "didn't change" in again

    # a change to code or raw data reruns exactly the stages that import or read it
    for touched in ("kdcompress/report/metrics.py", "kdcompress/report/card.py", "kdcompress/report/leaderboard.py"):
        with open(repo / touched, "a") as f:
            f.write("# touched\n")
    status = run(dvc + ["status"], repo, env)
    assert "evaluate:" in status and "ship:" in status  # the metrics and the card
    assert "train_teacher:" not in status and "distill:" not in status
    raw = next((repo / "data").iterdir())
    raw.write_bytes(raw.read_bytes() + b"\0")
    assert "prepare:" in run(dvc + ["status"], repo, env)
    run(["git", "checkout", "kdcompress/report"], repo, env)
    raw.write_bytes(raw.read_bytes()[:-1])
    assert "up to date" in run(dvc + ["status"], repo, env)

    metrics = run(dvc + ["metrics", "show"], repo, env)
    assert "student.top1" in metrics and "ratios.teacher_over_student_ort_p50" in metrics
    assert "speedup_vs_teacher" in metrics and "int8_shipped" in metrics  # summary.json
    plots_dir = tmp_path / "plots"
    run(dvc + ["plots", "show", "-o", str(plots_dir)], repo, env)
    page = (plots_dir / "index.html").read_text()
    assert "reliability.png" in page and "confusion.png" in page  # image plots render without a CDN

    out = run(dvc + ["exp", "run", "-S", "distill.method=ce"], repo, env)
    assert "Running stage 'distill'" in out and "Running stage 'train_teacher'" not in out
    params_diff = run(dvc + ["params", "diff"], repo, env)  # the experiment left params.yaml changed
    assert "distill.method" in params_diff and "ce" in params_diff
    metrics_diff = run(dvc + ["metrics", "diff"], repo, env)
    assert "student.top1" in metrics_diff
    # experiments keep their metrics (git-tracked, not ignored): `dvc exp show` compares them
    import json

    shown = json.loads(run(dvc + ["exp", "show", "--json"], repo, env))
    exps = [e for commit in shown for e in (commit.get("experiments") or [])]
    assert exps and all(r["data"]["metrics"]["artifacts/metrics/summary.json"]["data"]["top1"] > 0
                        for e in exps for r in e["revs"])
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    methods = {r.data.params.get("distill.method") for r in mlflow.search_runs(experiment_names=["kdcompress"],
                                                                               output_format="list")}
    assert {"kd", "ce"} <= methods  # the experiment's working copy logged into the real store
