"""The MLflow store: processes that start together on a fresh clone all log their runs."""

import multiprocessing

import pytest

from kdcompress.common import tracking


def _log_one_run(root: str, barrier, name: str) -> None:
    import os

    os.chdir(root)
    barrier.wait()  # every process opens the new store at the same moment
    with tracking.start_run("student", name):
        pass


@pytest.mark.slow  # three processes importing mlflow: ~15 s
def test_processes_that_start_together_share_a_new_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_log_one_run, args=(str(tmp_path), barrier, f"run{i}")) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]  # without the store lock, creating the tables races
    monkeypatch.chdir(tmp_path)
    mlflow = tracking._client_setup()
    names = {r.info.run_name for r in mlflow.search_runs(output_format="list")}
    assert names == {"run0", "run1", "run2"}
