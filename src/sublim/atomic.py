"""Atomic writes that survive SIGKILL: a file or directory appears whole or not at all, and what a killed writer
left behind is removed by the next writer of the same path.

Temp names carry ``<host>-<pid>`` (``.<name>.<host>-<pid>.XXXX.tmp``); a write first removes the temp files and
directories of the same path whose writer is this host's and dead. Modes are those an ordinary ``open`` /
``mkdir`` would give (0666 / 0777 less the umask), not ``mkstemp``'s 0600.
"""
from __future__ import annotations

import json
import os
import platform
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_file", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "is_temp_name", "sweep_leftovers_under"]

# what mkstemp/mkdtemp make of the prefixes below: ``.<name>.<host>-<pid>.[old.]XXXXXXXX[.tmp]``
_TEMP_NAME = re.compile(r"^\..+-\d+\.(?:old\.)?[a-z0-9_]{8}(?:\.tmp)?$")


def is_temp_name(name: str) -> bool:
    """Whether a file or directory name is one of this module's temp names (any host's, live or dead): what a
    listing of finished content must leave out."""
    return bool(_TEMP_NAME.match(name))


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _writer_tag() -> str:
    """``<host>-<pid>``: whose temp file this is (a dead writer's leftovers are removed by the next write)."""
    return f"{platform.node() or 'host'}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_leftovers(path: Path) -> None:
    """Remove what interrupted atomic writes of ``path`` left beside it: temp files and directories named
    ``.<name>.<host>-<pid>.*`` whose writer is this host's and no longer alive (a SIGKILL runs no cleanup).
    Another host's, or a live process's, are left alone."""
    import shutil

    host = platform.node() or "host"
    prefix = f".{path.name}.{host}-"
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        pid_s = e.name[len(prefix):].split(".", 1)[0]
        if not pid_s.isdigit() or int(pid_s) == os.getpid() or _alive(int(pid_s)):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                os.unlink(e.path)
        except OSError:
            pass


def sweep_leftovers_under(root: str | Path) -> None:
    """Remove, anywhere under ``root``, the temp files and directories of this host's writers that are no
    longer alive (as :func:`_sweep_leftovers` does beside one path): for a directory about to be listed as
    finished."""
    import shutil

    host = platform.node() or "host"
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if not is_temp_name(name):
                continue
            m = re.match(rf"^\..+\.{re.escape(host)}-(\d+)\.", name)
            if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
                continue
            p = os.path.join(dirpath, name)
            try:
                if name in dirnames:
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.unlink(p)
            except OSError:
                pass
        dirnames[:] = [d for d in dirnames if os.path.isdir(os.path.join(dirpath, d))]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory and an atomic rename. The file gets
    the mode an ordinary ``open`` would give it (0666 less the umask); leftovers of earlier writers of the
    same path that were killed mid-write are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that wants a file name (e.g. a Parquet writer); on
    success it is renamed onto ``path`` with the ordinary file mode, on failure removed. Killed writers'
    leftovers of the same path are removed first (as :func:`atomic_write_bytes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n")


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; on success rename it into place. An existing ``final`` is
    renamed aside first and deleted only after the new one is in place, so ``final`` is at every moment
    absent, the old directory or the new one, never half deleted. Leftovers of killed writers of the same
    path are removed first; the directory gets the mode ``mkdir`` would give it (0777 less the umask)."""
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(final)
    tag = _writer_tag()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}.", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}.old.", dir=final.parent))
            os.replace(final, aside / final.name)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
