"""The path users take: ``dvc repro`` runs ``python -m pipeline.<stage>``, which starts its workers
itself only when ``base.nproc`` x ``base.nnodes`` > 1. A bad value is one line (no launcher traceback),
a SIGKILL of the whole ``dvc repro`` process group leaves no training process behind (the workers,
in sessions of their own, die with their launcher), and the rerun resumes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, write_fashion_idx, write_params

from kdcompress.common import distributed
from kdcompress.config import load_params
from kdcompress.types import UserError


def test_rendezvous_keys_are_checked(tmp_path):
    def base(**values):
        write_params(tmp_path, base={"seed": 0, "device": "cpu", "num_threads": 1, **values})
        return load_params(tmp_path / "params.yaml")["base"]

    assert base(nnodes=2, rdzv_endpoint="10.0.0.1:29400").rdzv_endpoint == "10.0.0.1:29400"
    for values, message in (({"nnodes": 2}, "base.rdzv_endpoint: '' is not host:port; allowed: the first machine's"),
                            ({"nnodes": 2, "rdzv_endpoint": "10.0.0.1"}, "base.rdzv_endpoint: '10.0.0.1' is not"),
                            ({"nnodes": 2, "rdzv_endpoint": "h:0"}, "base.rdzv_endpoint: 'h:0' is not host:port"),
                            ({"rdzv_endpoint": "h:1"}, "base.rdzv_endpoint: 'h:1' does nothing unless base.nnodes > 1"),
                            ({"nnodes": 0}, "base.nnodes: 0 is out of range; allowed: >= 1")):
        with pytest.raises(UserError, match="^" + re.escape(message)):
            base(**values)


def test_several_processes_are_launched_only_when_asked_and_not_from_a_worker(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    write_params(tmp_path)
    one = load_params(tmp_path / "params.yaml")["base"]
    assert not distributed.wanted(one)
    for values in ({"nproc": 2}, {"nnodes": 2, "rdzv_endpoint": "127.0.0.1:29400"}):
        write_params(tmp_path, base={**yaml.safe_load((tmp_path / "params.yaml").read_text())["base"], **values})
        assert distributed.wanted(load_params(tmp_path / "params.yaml")["base"])
    monkeypatch.setenv("LOCAL_RANK", "0")  # a worker (ours or the user's own torchrun) trains itself
    assert not distributed.wanted(load_params(tmp_path / "params.yaml")["base"])


def test_a_workers_user_error_goes_to_its_launcher_not_to_stderr(tmp_path, monkeypatch, capsys):
    from pipeline._common import stage

    @stage
    def main(argv=None):
        raise UserError("distill.method: 'x' is not allowed")

    monkeypatch.setenv("KDCOMPRESS_ERROR_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert main([]) == 2 and capsys.readouterr().err == ""
    assert (tmp_path / "1").read_text() == "error: distill.method: 'x' is not allowed\n"
    monkeypatch.delenv("KDCOMPRESS_ERROR_DIR")
    assert main([]) == 2 and capsys.readouterr().err == "error: distill.method: 'x' is not allowed\n"


def test_a_crash_is_reported_by_its_root_cause():
    from types import SimpleNamespace

    def cause(**exitcodes):
        failures = {int(k[1:]): SimpleNamespace(exitcode=v, timestamp=5) for k, v in exitcodes.items()}
        return min(failures.items(), key=distributed._root_cause)[0]

    assert cause(r0=1, r1=-9, r2=-15) == 1  # the killed one, not the one that lost its peer
    assert cause(r0=-15, r1=1) == 1  # the failed one, not the one the launcher stopped
    assert cause(r0=1, r1=1) == 0


# ------------------------------------------------------------ through dvc repro: errors, SIGKILL, rerun


def training_processes(repo: Path) -> list[str]:
    """The processes whose working folder is ``repo`` (dvc, the stage, its workers): pid and command."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int(proc.name) != os.getpid() and (proc / "cwd").resolve() == repo:
                found.append(proc.name + ": " + (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours
            pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not sys.platform.startswith("linux"), reason="needs git, /proc")
def test_dvc_repro_errors_are_one_line_and_a_killed_run_leaves_nothing_and_resumes(tmp_path):
    repo = (tmp_path / "repo").resolve()
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "pipeline", "kdcompress", "models", "weights"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, repo / name)
    for cache in repo.rglob("__pycache__"):
        shutil.rmtree(cache)
    write_fashion_idx(repo / "data")
    good = {"data": {"dataset": "fashion_mnist", "root": "data", "val_fraction": 0.2, "download": False},
            "teacher": {"model": "tinycnn", "epochs": 1, "batch_size": 32, "lr": 0.05, "eval_batch_size": 64},
            "distill": {"student": "tinycnn", "method": "kd", "epochs": 4, "batch_size": 16, "lr": 0.05,
                        "eval_batch_size": 64}}
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(repo),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    dvc = [str(Path(bin_dir) / "dvc")]
    for cmd in (["git", "init", "-q"], dvc + ["init", "-q"], dvc + ["config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    resume = repo / "artifacts/resume/distill.pt"

    def params(nproc: int, **bad):
        sections = {k: {**v, **bad.get(k, {})} for k, v in good.items()}
        write_params(repo, base={"seed": 0, "device": "cpu", "num_threads": 1, "nproc": nproc}, **sections)

    def repro() -> subprocess.CompletedProcess:
        return subprocess.run([*dvc, "repro", "distill"], cwd=repo, env=env, capture_output=True, text=True,
                              check=False)

    def one_line_error(nproc: int, stage: str, section: str, key: str, value, line: str) -> None:
        params(nproc, **{section: {key: value}})
        failed = repro()
        assert failed.returncode != 0 and f"failed to reproduce '{stage}'" in failed.stderr, failed.stderr
        assert f"exited with {distributed.USER_ERROR}" in failed.stderr
        ours = [s for s in failed.stderr.splitlines() if s.strip() and not s.startswith(("ERROR: ", "WARNING: "))]
        assert len(ours) == 1 and ours[0].startswith(f"error: {line}"), failed.stderr  # dvc's own lines aside
        assert "Traceback" not in failed.stdout + failed.stderr and not training_processes(repo)

    try:
        for nproc, bad_distill in ((1, ("epochs", 0, "distill.epochs: 0 is out of range; allowed: >= 1")),
                                   (2, ("method", "data_free", "base.nproc: 2 processes do not run method"))):
            if nproc == 2:  # base changed, so train_teacher runs first: it refuses the value before starting anyone
                one_line_error(2, "train_teacher", "teacher", "epochs", -3, "teacher.epochs: -3 is out of range")
            params(nproc)
            with open(tmp_path / f"repro{nproc}.log", "w") as log:  # its own process group, like in a terminal
                run = subprocess.Popen(dvc + ["repro", "distill"], cwd=repo, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 600
            while run.poll() is None and time.time() < deadline:  # kill it once epoch 1 of 4 is on disk
                if resume.exists() and torch.load(resume, weights_only=True)["state"]["epoch"] >= 0:
                    break
                time.sleep(0.1)
            assert run.poll() is None, (tmp_path / f"repro{nproc}.log").read_text()[-3000:]
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            deadline = time.time() + 10
            while training_processes(repo) and time.time() < deadline:  # the kernel's SIGKILL takes a moment
                time.sleep(0.1)
            assert not training_processes(repo), training_processes(repo)
            assert not (repo / "artifacts/student/student.pt").exists()
            state = resume.read_bytes()

            one_line_error(nproc, "distill", "distill", *bad_distill)  # nproc 2: the workers refuse it, one line
            assert resume.read_bytes() == state  # nothing touched

            params(nproc)
            rerun = repro()
            assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
            assert "resume: continuing after epoch" in rerun.stdout
            assert (repo / "artifacts/student/student.pt").exists() and not resume.exists()

    finally:  # whatever failed above: nothing of this test left running
        for process in training_processes(repo):
            os.kill(int(process.split(":")[0]), signal.SIGKILL)
