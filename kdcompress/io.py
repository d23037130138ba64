"""Small file helpers: every output is written to a temporary file, then renamed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kdcompress.types import UserError

STALE_SECONDS = 24 * 3600  # a temporary file untouched this long is a killed write's, whoever wrote it


def _temp_prefix(path: Path) -> str:
    """Temporary files of ``path`` are named ``.{name}.{host}-{pid}.{random}.tmp``: they say who writes them."""
    return f".{path.name}.{socket.gethostname()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (OSError, OverflowError):
        return False
    return True


def _remove_stale_temps(path: Path, remove: Callable[[Path], None]) -> None:
    """Remove the temporary files (or folders) of ``path`` that killed writes left: those of a process of this
    host that is gone, those whose name says no writer (an older version's), and any untouched for
    ``STALE_SECONDS`` (another host's, a reused pid's). A live writer's temporary file stays."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        writer = tmp.name[len(path.name) + 2:-len(".tmp")].rpartition(".")[0]  # drop mkstemp's random part
        writer_host, _, pid = writer.rpartition("-")
        try:
            age = time.time() - tmp.stat().st_mtime
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        if not pid.isdigit() or age > STALE_SECONDS or (writer_host == host and not _alive(int(pid))):
            remove(tmp)


def atomic_write(path: str | Path, content: str | bytes | Callable[[Any], None], text: bool = False) -> Path:
    """Write ``content`` (a string, bytes, or a function that writes to a binary file object)
    to ``path`` via a temporary file in the same folder, flushed to disk before the rename, so
    readers never see half a file. Temporary files a killed earlier write of ``path`` left are removed; another
    process writing ``path`` at the same time keeps its own (the last rename wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path, lambda stale: stale.unlink(missing_ok=True))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if text or isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; when the block ends without error it replaces
    ``path`` whole (readers see the old folder or the new one, never a mix), else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path, lambda stale: shutil.rmtree(stale, ignore_errors=True))
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be read and copied
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", text=True)


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Rows of dicts as CSV (columns: the union of keys in first-seen order, unless given)."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [",".join(columns)] + [",".join("" if row.get(c) is None else str(row[c]) for c in columns) for row in rows]
    return atomic_write(path, "\n".join(lines) + "\n", text=True)


def read_json(path: str | Path, made_by: str) -> Any:
    """A JSON file another stage wrote; missing or unparsable is a one-line UserError naming ``made_by``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found (written by the {made_by} stage; run it first)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); rerun the {made_by} stage") from None


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def file_sha(path: str | Path) -> str:
    """The first 16 hex digits of the sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
