"""MLflow tracking: one run per teacher and one per student.

The store is a local sqlite file in the project root (``DVC_ROOT`` when DVC runs the stage, so
``dvc exp run`` working copies log into the real store), unless ``MLFLOW_TRACKING_URI`` is set.
Later stages (evaluate, export, benchmark) find the student's run by a tag holding the hash of
the student checkpoint: no run-id file, so stages that DVC skips do not break the link.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from kdcompress.io import file_sha

EXPERIMENT = "kdcompress"
TAG_ROLE, TAG_CHECKPOINT = "kdcompress.role", "kdcompress.checkpoint_sha"
# `mlflow ui` opens an experiment of this kind as model training (runs, metrics, charts), not its GenAI view
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"

for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


@contextmanager
def _store_lock():
    """Processes that start together on a new sqlite store (two `dvc exp run` jobs, a benchmark's
    side-by-side runs) race to create its tables, and all but one fail: the first to take this lock
    (a file beside the store) creates them, the others wait and then find them."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(uri.removeprefix("sqlite:///") + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _client_setup():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    with _store_lock():
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            mlflow.create_experiment(EXPERIMENT, artifact_location=(project_root() / "mlartifacts").as_uri(),
                                     tags={KIND_TAG: KIND})
        elif experiment.tags.get(KIND_TAG) != KIND:  # a store made before the tag: `mlflow ui` guessed GenAI
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def start_run(role: str, run_name: str, tags: dict[str, str] | None = None, run_id: str | None = None):
    """A new run (``role`` is 'teacher' or 'student'), or the run ``run_id`` continued (a resumed
    stage) when the store still has it."""
    mlflow = _client_setup()
    if run_id is not None and _exists(mlflow, run_id):
        return mlflow.start_run(run_id=run_id)
    return mlflow.start_run(run_name=run_name, tags={TAG_ROLE: role, **(tags or {})})


def _exists(mlflow, run_id: str) -> bool:
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def mark_killed(run_id: str) -> None:
    """End a run a killed stage left RUNNING and that will not be continued."""
    mlflow = _client_setup()
    if _exists(mlflow, run_id) and mlflow.get_run(run_id).info.status == "RUNNING":
        mlflow.MlflowClient().set_terminated(run_id, "KILLED")


def resume_run(role: str, checkpoint: str | Path, run_name: str):
    """The run whose checkpoint hash tag matches ``checkpoint``; a new one (tagged) if none does,
    e.g. after the MLflow store was deleted but DVC kept the checkpoint."""
    mlflow = _client_setup()
    sha = file_sha(checkpoint)
    found = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list", max_results=1,
                               filter_string=f"tags.`{TAG_ROLE}` = '{role}' and tags.`{TAG_CHECKPOINT}` = '{sha}'",
                               order_by=["attributes.start_time DESC"])
    if found:
        return mlflow.start_run(run_id=found[0].info.run_id)
    return mlflow.start_run(run_name=run_name, tags={TAG_ROLE: role, TAG_CHECKPOINT: sha})


def runs(role: str) -> list[dict]:
    """Every run of ``role`` in the store: ``{run_id, run_name, start_time, tags, metrics}`` (latest values)."""
    mlflow = _client_setup()
    found = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                               filter_string=f"tags.`{TAG_ROLE}` = '{role}'")
    return [{"run_id": r.info.run_id, "run_name": r.info.run_name, "start_time": r.info.start_time,
             "tags": dict(r.data.tags), "metrics": dict(r.data.metrics)} for r in found]


def tag_checkpoint(checkpoint: str | Path) -> None:
    """Mark the active run as the owner of ``checkpoint`` (call after saving it)."""
    import mlflow

    mlflow.set_tag(TAG_CHECKPOINT, file_sha(checkpoint))


def _flatten(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj
    return out


def log_params(nested: dict) -> None:
    """Log nested params flattened to dotted keys (``distill.lr``, ``methods.kd.temperature``)."""
    import mlflow

    mlflow.log_params(_flatten("", nested, {}))


def log_tags(nested: dict) -> None:
    """Nested values as tags with dotted keys: unlike params, a later value replaces an earlier one."""
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in _flatten("", nested, {}).items()})


def log_metrics(metrics: dict, step: int | None = None, prefix: str = "") -> None:
    import mlflow

    flat = _flatten(prefix, metrics, {})
    mlflow.log_metrics({k: float(v) for k, v in flat.items() if isinstance(v, (int, float))}, step=step)


def log_epoch(epoch: int, metrics: dict) -> None:
    """fit() callback: per-epoch metrics with the epoch as step."""
    log_metrics(metrics, step=epoch)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


def log_figure(fig, name: str, path: str | Path) -> None:
    """A matplotlib figure as an image of the active run (``figures/<name>``, shown in `mlflow ui`),
    also written as a PNG at ``path`` (a DVC image plot); the figure is closed."""
    import mlflow

    from kdcompress.io import save_figure

    mlflow.log_figure(fig, f"figures/{name}")
    save_figure(fig, path)


def log_onnx(proto, input_shape: list[int], name: str = "student_onnx") -> None:
    """Log an ONNX model as an MLflow model with an input/output signature."""
    import mlflow
    import mlflow.onnx
    import numpy as np
    from mlflow.models import infer_signature

    x = np.zeros((1, *input_shape), dtype=np.float32)
    num_classes = proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    signature = infer_signature(x, np.zeros((1, num_classes), dtype=np.float32))
    mlflow.onnx.log_model(proto, name=name, signature=signature)
