"""Memory vs stream storage of an image folder: the peak memory and time of prepare and of one training
epoch, and the throughput of a distillation step and of the loader alone.

    python benchmarks/stream_data.py --folders photos/p2k photos/p8k photos/p32k \\
        --image-size 224 --throughput-folder photos/p8k --throughput-size 112 \\
        --json benchmarks/results/stream_data.json

(image folders made by benchmarks/photo_folder.py). Part 1, for each folder and storage (data.storage: memory,
stream): ``python -m pipeline.prepare`` in a subprocess, with a params file written for the run
(data.dataset: image_folder, data.root: the folder, data.image_size, data.storage; -S for more): its seconds, peak
memory and the size of what it wrote; then one training epoch over that prepared data in a subprocess of this
script (the real ``fit()`` on at most --epoch-steps batches, over make_loader's loader for the storage): its
seconds, images/s and peak memory. Peak memory is given twice: the largest resident set of any process of the run
(wait4's ru_maxrss), and the peak over time of the proportional set sizes (PSS) of the whole process tree summed
(DataLoader workers included, shared pages counted once), sampled every 0.2 s.

Part 2, on --throughput-folder prepared at --throughput-size, in this one process: a distillation step (the
Distiller with method kd: the teacher's forward under no_grad, the student's forward, backward and SGD step) on
--batches batches from the memory loader and from the stream loader with each of --stream-workers workers, side by
side, alternating round by round (--rounds, every other round in reverse order, --warmup untimed batches each):
images/s (median over rounds) and the stream / memory ratio; then the same for the loaders alone, no model.

Every finished measurement is written to --json at once; a rerun skips those already there (delete a key to
measure it again). The prepared data and logs stay in --work. The markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds the packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml

from benchmarks.photo_folder import positive
from kdcompress.config import load_params
from kdcompress.data.loader import fit_loaders, make_loader
from kdcompress.data.prepared import load_prepared
from kdcompress.io import write_json
from kdcompress.methods import build_loss
from kdcompress.runtime import resolve_device, resolve_precision, seed_everything
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.selection import FullData
from models import create_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SECONDS = 0.2  # how often the process tree's memory is sampled
PHOTO_PARAMS = {"data.train_transform": "random_resized_crop"}  # the photos' training transform (-S to change)
RUN_KEYS = ("data.dataset", "data.root", "data.image_size", "data.storage")  # params shown in the table's rows
MIB = 2 ** 20


# --- measuring a subprocess ---------------------------------------------------------------------

def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:  # gone meanwhile
            continue
    return found


def pss_bytes(pid: int) -> int:
    """The proportional set size of process ``pid`` (0 when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` from the repository root, its output to ``log``; its seconds, the largest resident set of
    any of its processes and the peak of its process tree's summed PSS (MiB). Exits naming the log on failure."""
    peak = [0]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample():
            while not done.wait(SAMPLE_SECONDS):
                peak[0] = max(peak[0], sum(map(pss_bytes, tree(proc.pid))))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise SystemExit(f"{' '.join(cmd[1:4])}... failed (exit {proc.returncode}; log: {log}): "
                         f"{lines[-1] if lines else ''}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss * 1024 / MIB, 1),
            "peak_pss_mib": round(peak[0] / MIB, 1)}


def disk_mib(folder: Path) -> float:
    """The bytes of the files under ``folder``, in MiB."""
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / MIB, 2)


# --- part 1: prepare and one epoch, each in a subprocess ------------------------------------------

def prepared(args, folder: Path, size: int, storage: str, results: dict) -> Path:
    """The prepared data of ``folder`` at ``size`` px in ``storage``, made by the prepare stage (measured and
    recorded under ``prepare/<folder>/<size>/<storage>`` unless it is already, and its output still there)."""
    key, run = f"prepare/{folder.name}/{size}/{storage}", args.work / f"{folder.name}_{size}_{storage}"
    out = run / "prepared"
    if key in results["measurements"] and (out / "meta.json").exists():
        return out
    from benchmarks._runs import write_params  # here: it loads every stage, which the epoch's process needs not

    overrides = {"data.dataset": "image_folder", "data.root": str(folder.resolve()), "data.image_size": size,
                 "data.storage": storage, "data.workers": args.workers, **PHOTO_PARAMS, **args.overrides}
    write_params(run, overrides, str(ROOT / "params.yaml"))
    cmd = [sys.executable, "-m", "pipeline.prepare", "--params", str(run / "params.yaml"), "--out", str(out),
           "--metrics", str(run / "prepare.json")]
    record = measure(cmd, run / "prepare.log")
    summary = json.loads((run / "prepare.json").read_text())
    if summary.get("storage") != storage:
        raise SystemExit(f"{key}: prepare wrote storage {summary.get('storage')!r}, asked for {storage!r}")
    record.update(disk_mib=disk_mib(out), folder_mib=disk_mib(folder), split_sizes={
        n: summary[n] for n in ("train", "val", "test")}, decoded_gb=summary.get("decoded_gb"), params=overrides)
    save(args, results, key, record)
    return out


def epoch_run(args, folder: Path, storage: str, results: dict) -> None:
    """One training epoch over the prepared data, in a subprocess: ``epoch/<folder>/<size>/<storage>``."""
    key = f"epoch/{folder.name}/{args.image_size}/{storage}"
    if key in results["measurements"]:
        return
    data = prepared(args, folder, args.image_size, storage, results)
    run = data.parent
    cmd = [sys.executable, str(Path(__file__).resolve()), "epoch", "--params", str(run / "params.yaml"),
           "--data", str(data), "--steps", str(args.epoch_steps), "--batch-size", str(args.batch_size),
           "--model", args.epoch_model, "--out", str(run / "epoch.json")]
    record = measure(cmd, run / "epoch.log")
    save(args, results, key, {**record, **json.loads((run / "epoch.json").read_text())})


def train_epoch(params_path: str, data_dir: str, steps: int, batch_size: int, model_name: str) -> dict:
    """fit() for one epoch of at most ``steps`` batches of ``model_name`` over the prepared data in
    ``data_dir``, with the loaders the distill stage makes (data.workers) and the distill section's other
    hyper-parameters (constant LR); returns what it did."""
    params = load_params(params_path)
    base, workers = params["base"], params["data"].workers
    seed_everything(base.seed, base.num_threads)
    device = resolve_device(base.device)
    cfg = dataclasses.replace(params["distill"], epochs=1, batch_size=batch_size, lr_schedule="constant")
    data = load_prepared(data_dir, splits=("train", "val"))
    train, val = fit_loaders(data, device, cfg, workers, base.seed)
    model = create_model(model_name, len(data.classes), data.input_shape[0])
    model = model.to(device, memory_format=torch.channels_last)
    samples = min(len(train), steps * batch_size)
    precision = resolve_precision(cfg.precision, model, device)[0]
    result = fit(Distiller(model), train, val, FullData(samples), cfg, precision=precision)
    seconds = result.history[-1]["epoch_seconds"]
    return {"model": model_name, "workers": workers if data.storage == "stream" else 0, "batch_size": batch_size,
            "steps": train.num_batches(samples), "samples": samples, "epoch_seconds": round(seconds, 2),
            "images_per_s": round(samples / seconds, 1), "val_images": len(val), "threads": torch.get_num_threads(),
            "device": str(device)}


# --- part 2: throughput in this process -------------------------------------------------------------

def timed_rounds(loaders: dict, consume: Callable, args, device: torch.device) -> dict[str, dict]:
    """Images/s of ``consume(x, y)`` over --batches batches of each loader, round by round, every other round in
    reverse order; --warmup untimed batches first in each (epoch r of round r: the same samples for each loader)."""
    need = args.warmup + args.batches
    for name, loader in loaders.items():
        if loader.num_batches() < need:
            raise SystemExit(f"{name}: an epoch has {loader.num_batches()} batches; --warmup + --batches is {need}")
    rates = {name: [] for name in loaders}
    for r in range(args.rounds):
        for name in (list(loaders) if r % 2 == 0 else list(reversed(loaders))):
            batches, images = loaders[name].batches(shuffle=True, augment=True, epoch=r), 0
            for i, (x, y, _) in enumerate(batches):
                if i == args.warmup:
                    sync(device)
                    start = time.perf_counter()
                consume(x, y)
                images += len(y) if i >= args.warmup else 0
                if i + 1 == need:
                    break
            sync(device)
            rates[name].append(images / (time.perf_counter() - start))
            batches.close()  # a stream loader's pass ends here: its workers go idle
    return {name: {"images_per_s": round(statistics.median(r), 1), "rounds": [round(v, 1) for v in r]}
            for name, r in rates.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ratios(configs: dict[str, dict]) -> dict[str, dict]:
    """Each stream configuration's images/s over the memory loader's, beside its numbers."""
    memory = configs.get("memory", {}).get("images_per_s")
    return {name: {**c, **({"over_memory": round(c["images_per_s"] / memory, 3)} if memory else {})}
            for name, c in configs.items()}


def throughput(args, results: dict) -> None:
    """Part 2: ``step/<folder>/<size>`` (distillation step) and ``loader/<folder>/<size>`` (loader alone)."""
    folder, size = args.throughput_folder, args.throughput_size
    keys = {part: f"{part}/{folder.name}/{size}" for part in ("step", "loader") if part in args.parts}
    if all(k in results["measurements"] for k in keys.values()):
        return
    dirs = {storage: prepared(args, folder, size, storage, results) for storage in args.storages}
    params = load_params(next(iter(dirs.values())).parent / "params.yaml")
    seed_everything(params["base"].seed, params["base"].num_threads)
    device, cfg = resolve_device(params["base"].device), params["distill"]
    loaders, shape = {}, None
    for storage, data_dir in dirs.items():
        data = load_prepared(data_dir, splits=("train",))
        shape = len(data.classes), data.input_shape[0]
        for workers in ([0] if storage == "memory" else args.stream_workers):
            name = "memory" if storage == "memory" else f"stream_w{workers}"
            loaders[name] = make_loader(data, "train", device, args.batch_size, workers=workers,
                                        crop_padding=cfg.crop_padding, hflip=cfg.hflip, seed=params["base"].seed)
    common = {"batch_size": args.batch_size, "batches": args.batches, "warmup": args.warmup, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "device": str(device)}
    if "step" in keys and keys["step"] not in results["measurements"]:
        step = distillation_step(args, *shape, device)
        save(args, results, keys["step"], {**common, "teacher": args.teacher, "student": args.student,
                                           "configs": ratios(timed_rounds(loaders, step, args, device))})
    if "loader" in keys and keys["loader"] not in results["measurements"]:
        save(args, results, keys["loader"], {**common, "configs": ratios(timed_rounds(
            loaders, lambda x, y: None, args, device))})


def distillation_step(args, num_classes: int, channels: int, device: torch.device) -> Callable:
    """``step(x, y)``: one KD step of --student from --teacher (random weights: only the time matters)."""
    def build(name: str) -> torch.nn.Module:
        return create_model(name, num_classes, channels).to(device, memory_format=torch.channels_last)

    distiller = Distiller(build(args.student), build(args.teacher), build_loss("kd", {})).train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = distiller(x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


# --- results ------------------------------------------------------------------------------------

def host() -> str:
    """The CPU model (lscpu's "Model name"), the cores, and the GPU when there is one."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name:"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}"


def save(args, results: dict, key: str, record: dict) -> None:
    results["measurements"][key] = {**record, "host": host(), "date": datetime.date.today().isoformat()}
    write_json(args.json, results)
    print(f"{key}: {json.dumps(results['measurements'][key])}", flush=True)


def table(results: dict) -> str:
    """The measurements as markdown: where and when, part 1 (prepare + epoch per folder and storage), part 2."""
    m = results["measurements"]
    params = sorted({", ".join(f"{k}: {v}" for k, v in r["params"].items() if k not in RUN_KEYS)
                     for r in m.values() if "params" in r})
    head = (f"Host: {'; '.join(sorted({r['host'] for r in m.values()}))}. "
            f"Dates: {', '.join(sorted({r['date'] for r in m.values()}))}. Params: {'; '.join(params) or '-'}.")
    return "\n".join([head, "", *storage_rows(m), *throughput_rows(m)])


def storage_rows(m: dict) -> list[str]:
    """Part 1: one row per prepared folder, size and storage, with its epoch when measured."""
    lines = ["| folder | px | storage | train/val/test | prepare s | prepare peak RSS / PSS MiB | prepared MiB "
             "| epoch steps | epoch s | epoch img/s | epoch peak RSS / PSS MiB |", "|" + " --- |" * 11]
    for key, p in m.items():
        if not key.startswith("prepare/"):
            continue
        _, folder, size, storage = key.split("/")
        e = m.get(f"epoch/{folder}/{size}/{storage}")
        sizes = "/".join(str(p["split_sizes"][n]) for n in ("train", "val", "test"))
        epoch = (f"{e['steps']} | {e['epoch_seconds']} | {e['images_per_s']} | {e['peak_rss_mib']:.0f} / "
                 f"{e['peak_pss_mib']:.0f}") if e else "- | - | - | -"
        lines.append(f"| {folder} | {size} | {storage} | {sizes} | {p['seconds']} | {p['peak_rss_mib']:.0f} / "
                     f"{p['peak_pss_mib']:.0f} | {p['disk_mib']} | {epoch} |")
    return lines


def throughput_rows(m: dict) -> list[str]:
    """Part 2: a table per measurement, one row per loader."""
    lines = []
    for key, r in m.items():
        part, _, where = key.partition("/")
        if part not in ("step", "loader"):
            continue
        what = f"distillation step, {r['teacher']} -> {r['student']}" if part == "step" else "loader alone"
        lines += ["", f"{what}, {where} px: {r['batches']} batches of {r['batch_size']} x {r['rounds']} rounds, "
                  f"{r['threads']} threads, {r['device']}", "",
                  "| loader | images/s (median) | / memory | rounds |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {c['images_per_s']} | {c.get('over_memory', '-')} | "
                  f"{', '.join(map(str, c['rounds']))} |" for name, c in r["configs"].items()]
    return lines


# --- command line -------------------------------------------------------------------------------

PARTS = ("prepare", "epoch", "step", "loader")



def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folders", nargs="*", type=Path, default=[], help="image folders for part 1")
    p.add_argument("--image-size", type=positive, default=224, help="part 1: data.image_size")
    p.add_argument("--storages", nargs="+", choices=("memory", "stream"), default=["memory", "stream"])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--workers", type=int, default=2, help="data.workers: prepare's checks, the epoch's stream loader")
    p.add_argument("--epoch-steps", type=positive, default=300, help="part 1: at most this many training batches")
    p.add_argument("--epoch-model", default="tv:mobilenet_v3_small")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--throughput-folder", type=Path, help="image folder for part 2 (none: no part 2)")
    p.add_argument("--throughput-size", type=positive, default=112)
    p.add_argument("--teacher", default="tv:resnet18")
    p.add_argument("--student", default="tv:mobilenet_v3_small")
    p.add_argument("--stream-workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batches", type=positive, default=40, help="part 2: timed batches per loader and round")
    p.add_argument("--warmup", type=int, default=3, help="part 2: untimed batches before them")
    p.add_argument("--rounds", type=positive, default=3)
    p.add_argument("-S", dest="overrides", action="append", default=[], help="key=value, more params for every run")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/stream_data.json"))
    p.add_argument("--work", type=Path, default=Path("benchmarks/results/runs/stream_data"),
                   help="prepared data, params and logs of every run")
    args = p.parse_args(argv)
    args.overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    args.work, args.json = args.work.resolve(), args.json.resolve()
    return args


def epoch_main(argv: list[str]) -> None:
    """``stream_data.py epoch ...``: the training epoch of part 1, run by ``epoch_run`` in its own process."""
    p = argparse.ArgumentParser(prog="stream_data.py epoch")
    for name in ("--params", "--data", "--model", "--out"):
        p.add_argument(name, required=True)
    for name in ("--steps", "--batch-size"):
        p.add_argument(name, type=int, required=True)
    a = p.parse_args(argv)
    write_json(a.out, train_epoch(a.params, a.data, a.steps, a.batch_size, a.model))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["epoch"]:
        return epoch_main(argv[1:])
    args = parse(argv)
    results = json.loads(args.json.read_text()) if args.json.exists() else {"measurements": {}}
    for folder in args.folders:
        for storage in args.storages:
            if "prepare" in args.parts:
                prepared(args, folder, args.image_size, storage, results)
            if "epoch" in args.parts:
                epoch_run(args, folder, storage, results)
    if args.throughput_folder and {"step", "loader"} & set(args.parts):
        throughput(args, results)
    print(table(results))


if __name__ == "__main__":
    main()
