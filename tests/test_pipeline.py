"""Every stage's main() end to end on tiny data in a temp dir, with a real MLflow store, real
ONNX export and real onnxruntime; and the bad-input errors (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import TINY, write_params

from pipeline import benchmark, distill, evaluate, export, prepare, quantize, ship, train_teacher


@pytest.mark.slow
def test_all_stages_end_to_end(project, capsys):
    assert prepare.main([]) == 0
    meta = json.loads((project / "artifacts/data/meta.json").read_text())
    assert meta["sizes"] == {"train": 96, "val": 24, "test": 60} and meta["input_shape"] == [1, 16, 16]
    assert meta["classes"][0] == "T-shirt/top"

    assert train_teacher.main([]) == 0
    assert distill.main([]) == 0
    assert evaluate.main([]) == 0
    assert export.main([]) == 0
    assert quantize.main([]) == 0
    assert benchmark.main([]) == 0
    assert ship.main([]) == 0

    report = json.loads((project / "artifacts/metrics/evaluate.json").read_text())
    for key in ("top1", "top5", "nll", "ece", "mce", "brier", "entropy", "agreement", "kl_teacher_student",
                "logit_cosine"):
        assert key in report["student"]
    assert "agreement" not in report["teacher"]
    confusion = (project / "artifacts/plots/confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 61

    exported = json.loads((project / "artifacts/metrics/export.json").read_text())
    for role in ("student", "teacher"):
        assert exported[role]["max_abs_diff"] <= 1e-4 and exported[role]["top1_agreement"] == 1.0
        assert exported[role]["samples"] == 24  # the val split
    model = onnx.load(str(project / "artifacts/onnx/student.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"])[9] == "Ankle boot" and json.loads(props["input_shape"]) == ["batch", 1, 16, 16]
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert not list(project.glob("artifacts/onnx/*.data"))  # single file
    for role in ("student", "teacher"):
        int8 = onnx.load(str(project / f"artifacts/onnx/{role}.int8.onnx"))
        assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
        assert {p.key: p.value for p in int8.metadata_props}["kdcompress.precision"] == "int8"
    gate = json.loads((project / "artifacts/metrics/quantize.json").read_text())
    assert gate["student"]["calibration_samples"] == 96  # all of train
    assert gate["student"]["val"]["samples"] == 24 and gate["student"]["test"]["samples"] == 60
    assert (project / "artifacts/plots/spot_routing.csv").read_text().strip() == "epoch"  # fixed spots: no routing
    for name in ("reliability.png", "confusion.png", "distill_history.png", "teacher_history.png", "spot_routing.png"):
        assert (project / "artifacts/plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert "Parity ONNX vs PyTorch" in (project / "artifacts/ship/MODEL_CARD.md").read_text()

    bench = json.loads((project / "artifacts/metrics/benchmark.json").read_text())
    for role in ("student", "teacher"):
        for precision in ("fp32", "int8"):
            b = bench[role][precision]
            assert b["ort_edge"]["runs"] >= 200 and b["ort_server"]["batch"] == 8 and b["file_bytes"] > 0
            assert b["memory_edge"]["peak_rss_mib"] > 0
    assert bench["ratios"]["teacher_over_student_ort_p50"] > 0 and bench["environment"]["onnxruntime"]

    shipped = sorted(p.name for p in (project / "artifacts/ship").iterdir())
    summary = json.loads((project / "artifacts/metrics/summary.json").read_text())
    assert shipped == (["MODEL_CARD.md", "model.fp32.onnx", "model.onnx", "predict.py"] if summary["int8_shipped"]
                       else ["MODEL_CARD.md", "model.onnx", "predict.py"])
    assert "**Decision: " in (project / "artifacts/ship/MODEL_CARD.md").read_text()

    import mlflow

    runs = {r.data.tags["kdcompress.role"]: r for r in mlflow.search_runs(experiment_names=["kdcompress"],
                                                                          output_format="list")}
    assert set(runs) == {"teacher", "student"}
    experiment = mlflow.get_experiment_by_name("kdcompress")  # `mlflow ui` opens it as model training, not GenAI
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    student = runs["student"].data
    assert student.params["distill.method"] == "kd" and student.params["methods.kd.temperature"] == "4.0"
    assert student.tags["kdcompress.teacher_runtime"] == "onnxruntime"  # auto, on the CPU
    assert student.tags["kdcompress.shipped"] in ("fp32", "int8") and student.tags["benchmark.env.cpu"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs["student"].info.run_id, "figures")}
    assert artifacts == {"figures/confusion.png", "figures/reliability.png", "figures/training_curves.png"}
    for key in ("val_acc", "test.top1", "test.ece", "teacher_test.top1", "export.student.max_abs_diff",
                "benchmark.student.int8.ort_edge.p50_ms", "benchmark.ratios.teacher_over_student_ort_p50",
                "quantize.student.val.int8_top1", "quantize.student.test.int8_top1", "ship.val.top1", "ship.test.top1"):
        assert key in student.metrics, key
    assert "test.top1" in runs["teacher"].data.metrics
    models = mlflow.search_logged_models(experiment_ids=[runs["student"].info.experiment_id], output_format="list")
    assert any(m.source_run_id == runs["student"].info.run_id for m in models)


@pytest.mark.slow
def test_export_writes_nothing_when_the_parity_gate_fails(project, capsys):
    for step in (prepare, train_teacher, distill, evaluate):
        assert step.main([]) == 0
    write_params(project, export={"atol": 1e-12})  # float32 ONNX vs PyTorch differ by ~1e-6
    assert export.main([]) == 2
    assert "parity check failed for artifacts/onnx/student.onnx" in capsys.readouterr().err
    assert not list((project / "artifacts").glob("onnx/*"))


@pytest.mark.parametrize("damage, message", [
    ("truncate_train", "artifacts/data/train.pt: not a readable prepared split ("),
    ("corrupt_meta", "artifacts/data/meta.json: corrupt prepared metadata (JSONDecodeError"),
    ("rgb_teacher", "artifacts/teacher/teacher.pt: the model takes 3-channel images and predicts 10 classes; "
                    "the data has 1 channels and 10 classes"),
])
def test_a_bad_file_between_stages_is_one_line(project, capsys, damage, message):
    from kdcompress.common.checkpoint import save_checkpoint
    from models import create_model

    assert prepare.main([]) == 0
    data = project / "artifacts/data"
    if damage == "truncate_train":
        blob = (data / "train.pt").read_bytes()
        (data / "train.pt").write_bytes(blob[:len(blob) // 2])
    elif damage == "corrupt_meta":
        (data / "meta.json").write_text('{"classes": [')
    else:
        save_checkpoint(project / "artifacts/teacher/teacher.pt", "resnet20", 10, 3,
                        create_model("resnet20", 10, 3).state_dict())
    capsys.readouterr()
    assert distill.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (project / "artifacts/student").exists()


def test_teacher_checkpoint_from_user(project, tmp_path):
    """teacher.checkpoint loads the user's weights; a wrong architecture is one clear error."""
    import torch

    from models import create_model

    assert prepare.main([]) == 0
    weights = tmp_path / "mine.pt"
    torch.save(create_model("resnet20", 10, 1).state_dict(), weights)
    write_params(project, teacher={"checkpoint": str(weights), "eval_batch_size": 64})  # no training keys: unused
    assert train_teacher.main([]) == 0
    torch.save(create_model("resnet32", 10, 1).state_dict(), weights)
    (project / "artifacts/teacher/teacher.pt").unlink()
    assert train_teacher.main([]) == 2
    assert not (project / "artifacts/teacher/teacher.pt").exists()


@pytest.mark.parametrize("section, values, message", [
    ("distill", {"method": "nope"}, "distill.method: unknown method 'nope'; allowed:"),
    ("distill", {"epochs": 0}, "distill.epochs: 0 is out of range; allowed: >= 1"),
    ("distill", {"lr": "fast"}, "distill.lr: expected float, got str"),
    ("distill", {"sampling": "some"}, "distill.sampling: 'some' is not allowed; allowed: full, sakd"),
    ("distill", {"method": "data_free", "sampling": "sakd"},
     "distill.sampling: 'sakd' needs a method that distils on the real samples; method 'data_free' allows: full"),
    ("distill", {"method": "data_free", "teacher_runtime": "onnxruntime"},
     "distill.teacher_runtime: 'onnxruntime' is not possible here (this method back-propagates through it)"),
    ("distill", {"teacher_runtime": "tensorrt"}, "distill.teacher_runtime: 'tensorrt' is not allowed; allowed: auto"),
    ("distill", {"student": "bignet"}, "unknown model 'bignet'; allowed:"),
    ("distill", {"typo_key": 1}, "distill.typo_key: unknown key; allowed:"),
    ("distill", {"ce_weight": -1}, "distill.ce_weight: -1.0 is out of range; allowed: >= 0.0"),
    ("distill", {"method": "ce", "ce_weight": 0.5}, "distill.ce_weight / distill.kd_weight: method 'ce' trains on"),
    ("distill", {"spots": "everywhere"}, "distill.spots: 'everywhere' is not allowed; allowed: fixed, adaptive"),
    ("distill", {"spots": "adaptive"}, "distill.spots: 'adaptive' routes the spots of a feature method, and method "
                                       "'kd' has none; allowed: fixed"),
    ("routing", {"temperature": 0}, "routing.temperature: 0.0 is out of range; allowed: > 0.0"),
    ("methods", {"at": {"spots": ["stage1"]}}, "methods.at.spots: expected str, got list"),
    ("methods", {"dkd": {"beta": -1.0}}, "methods.dkd.beta: -1.0 is out of range"),  # not the chosen method
    ("methods", {"kdd": {}}, "methods.kdd: unknown method; allowed:"),
    ("methods", {"kd": {"temprature": 2}}, "methods.kd.temprature: unknown key; allowed: "),
    ("methods", {"kd": {"temperature": "hot"}}, "methods.kd.temperature: expected float"),
])
def test_bad_params_fail_in_one_line_and_write_nothing(project, capsys, section, values, message):
    assert prepare.main([]) == 0
    capsys.readouterr()
    write_params(project, **{section: {**TINY.get(section, {}), **values}})
    assert distill.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (project / "artifacts/student").exists()


@pytest.mark.slow
def test_adaptive_spots_end_to_end_ship_the_same_onnx_interface(project):
    import mlflow

    def interface(path):
        graph = onnx.load(str(path)).graph
        return [(v.name, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
                for v in [*graph.input, *graph.output]]

    write_params(project, distill={**TINY["distill"], "method": "at", "epochs": 1, "spots": "adaptive"})
    for step in (prepare, train_teacher, distill, evaluate, export):
        assert step.main([]) == 0
    # the interface every fixed-spot student has (test_all_stages_end_to_end): nothing of the router
    assert interface(project / "artifacts/onnx/student.onnx") == [("input", ["batch", 1, 16, 16]),
                                                                  ("logits", ["batch", 10])]
    header = (project / "artifacts/plots/spot_routing.csv").read_text().splitlines()[0].split(",")
    assert header == ["epoch", "val_acc", "routed_stage1", "routed_stage2", "routed_stage3", "routed_output",
                      "graft_val_acc"]
    assert (project / "artifacts/plots/spot_routing.png").read_bytes()[:4] == b"\x89PNG"
    run = mlflow.search_runs(experiment_names=["kdcompress"], filter_string="tags.`kdcompress.spots` = 'adaptive'",
                             output_format="list")[0]
    assert {"routed_stage1", "routed_output", "graft_val_acc"} <= set(run.data.metrics)
    # onnxruntime serves the teacher's forward; the graft runs its PyTorch stages
    assert run.data.params["routing.temperature"] == "5.0"
    assert run.data.tags["kdcompress.teacher_runtime"] == "onnxruntime"


@pytest.mark.slow
def test_sakd_settings_that_cannot_work_are_refused(project, capsys):
    write_params(project, teacher={**TINY["teacher"], "model": "tinycnn"})
    assert prepare.main([]) == 0 and train_teacher.main([]) == 0
    capsys.readouterr()  # 16x16 images: patches of 9 leave a 1x1 grid
    write_params(project, teacher={**TINY["teacher"], "model": "tinycnn"},
                 distill={**TINY["distill"], "sampling": "sakd"}, sakd={"shuffle": "patch", "patch_size": 9})
    assert distill.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: sakd.patch_size: 9 leaves a single patch on 16x16 images, so the shuffle would change "
                   "nothing; allowed: 1..8")
    assert not (project / "artifacts/student").exists()
    write_params(project, teacher={**TINY["teacher"], "model": "tinycnn"},
                 distill={**TINY["distill"], "sampling": "sakd", "teacher_runtime": "torch"},
                 sakd={"patch_size": 4, "pass_teacher": "int8"})
    assert distill.main([]) == 2
    assert "sakd.pass_teacher: 'int8' runs the onnxruntime teacher quantized" in capsys.readouterr().err
    assert not (project / "artifacts/student").exists()


def test_bad_params_file_and_arguments(project, capsys):
    (project / "params.yaml").write_text("base: {seed: 0}\nteachr: {}\n")
    assert prepare.main([]) == 2
    assert "teachr: unknown params section" in capsys.readouterr().err
    assert prepare.main(["--params", "missing.yaml"]) == 2
    assert "params file not found: missing.yaml" in capsys.readouterr().err
    assert prepare.main(["--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert not (project / "artifacts").exists()


def test_missing_dataset_says_how_to_get_it(project, capsys):
    write_params(project, data={**TINY["data"], "dataset": "mnist", "root": "nowhere"})
    assert prepare.main([]) == 2
    err = capsys.readouterr().err
    assert "data.dataset=mnist: IDX files not found in nowhere" in err
    assert not (project / "artifacts").exists()
