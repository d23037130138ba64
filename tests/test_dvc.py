"""The real DVC pipeline in a temp git repo on tiny data: repro, a no-op second repro,
metrics/params/plots commands and the README's sweep: queued experiments run two at a time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, TINY, write_fashion_idx, write_params

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

    # the README's sweep, two experiments at a time on one MLflow store and one teacher cache
    for method in ("ce", "logit_l2"):
        run(dvc + ["exp", "run", "--queue", "-C", "data", "-S", f"distill.method={method}"], repo, env)
    run(dvc + ["queue", "start", "--jobs", "2"], repo, env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = run(dvc + ["queue", "status"], repo, env)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    failed = [line.split()[1] for line in status.splitlines() if line.endswith("Failed")]
    assert status.count("Success") == 2, status + "".join(run(dvc + ["queue", "logs", n], repo, env)[-3000:]
                                                          for n in failed)
    shown = json.loads(run(dvc + ["exp", "show", "--json"], repo, env))
    exps = [r for commit in shown for e in (commit.get("experiments") or []) for r in e["revs"]]
    assert len(exps) == 2 and all(r["data"]["metrics"]["artifacts/metrics/summary.json"]["data"]["test"]["top1"] > 0
                                  for r in exps)
    assert {r["data"]["params"]["params.yaml"]["data"]["distill"]["method"] for r in exps} == {"ce", "logit_l2"}

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    students = mlflow.search_runs(experiment_names=["kdcompress"], output_format="list",
                                  filter_string="tags.`kdcompress.role` = 'student'")
    assert sorted(r.data.params["distill.method"] for r in students) == ["ce", "kd", "logit_l2"]  # one each
    assert all(r.info.status == "FINISHED" for r in students)
    for r in students:  # every stage of every experiment logged into its run
        assert {"val_acc", "test.top1", "export.student.max_abs_diff", "quantize.student.val.int8_top1",
                "benchmark.student.fp32.ort_edge.p50_ms", "ship.test.top1"} <= set(r.data.metrics), r.data.params
    run([sys.executable, "-m", "pipeline.leaderboard", "--out", str(tmp_path / "board")], repo, env)
    ranks = (tmp_path / "board" / "ranks.md").read_text()
    assert all(f"{r.data.tags['kdcompress.method']} #{r.info.run_id[:6]}" in ranks for r in students)

    # on the finished pipeline, a bad value in params.yaml for any stage: one line naming the key, no traceback
    good = (repo / "params.yaml").read_text()
    for section, key, value in [("data", "val_fraction", 0.9), ("data", "dataset", "imagenet"),
                                ("teacher", "epochs", -3), ("distill", "lr", "fast"), ("export", "opset", 7),
                                ("quantize", "calibration", "magic"), ("quantize", "max_drop", -1),
                                ("benchmark", "runs", 10)]:
        write_params(repo, data={"dataset": "fashion_mnist", "root": "data", "val_fraction": 0.2, "download": False,
                                 **({key: value} if section == "data" else {})},
                     **({section: {**TINY.get(section, {}), key: value}} if section != "data" else {}))
        failed = subprocess.run(dvc + ["repro"], cwd=repo, env=env, capture_output=True, text=True)
        ours = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert failed.returncode != 0 and "Traceback" not in failed.stdout + failed.stderr, failed.stderr
        assert len(ours) == 1 and ours[0].startswith(f"error: {section}.{key}: "), failed.stderr
        (repo / "params.yaml").write_text(good)
