"""Run directories: atomic writes, streamed JSONL that survives SIGKILL, stage cache keys, environment info.

A stage's output lives in ``<run>/stages/<name>-<key>/``; ``key`` hashes the stage's resolved config and the
content hashes of its inputs. A stage is finished when its ``_DONE`` marker exists; anything else in the
directory is partial work that the stage may resume from (streamed rows) or redo.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Self

from sublim.atomic import (  # noqa: F401  (the run directory's writes; imported from here by callers)
    atomic_dir,
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_temp_name,
    sweep_leftovers_under,
)

DONE = "_DONE"


def canonical_json(obj: Any) -> str:
    """Deterministic JSON used for hashing (sorted keys, no whitespace)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_obj(obj: Any) -> str:
    return sha256_text(canonical_json(obj))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a malformed line gives a one-line error naming the file and line."""
    rows: list[dict[str, Any]] = []
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                # a bad input file (ValueError, like the JSON error above), not a caller's type error
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")  # noqa: TRY004
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    return atomic_write_text(path, text)


class JsonlStream:
    """Append-only JSONL writer that survives SIGKILL: on open, a torn last line is cut off, and the
    complete rows already on disk are returned by :meth:`existing`. Each :meth:`write` flushes and fsyncs."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict[str, Any]] = []
        if self.path.exists():
            data = self.path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut != len(data):  # torn tail from a killed writer
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
                data = data[:cut]
            for line in data.decode("utf-8").splitlines():
                if line.strip():
                    self._rows.append(json.loads(line))
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the stream's life

    def existing(self) -> list[dict[str, Any]]:
        return list(self._rows)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
        if text:
            self._f.write(text)
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def git_revision(start: str | Path | None = None) -> str | None:
    """The git revision of the sublim source tree (None outside a checkout)."""
    here = Path(start) if start else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        rev = out.stdout.strip()
        if out.returncode != 0 or not rev:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


_PACKAGES = ("sublim", "torch", "transformers", "peft", "tokenizers", "numpy", "scipy", "pydantic", "datasets")


# the CPU features float results and bf16 speed depend on (docs/results/organism.md, "Robust to the machine")
_CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in /proc/cpuinfo (None where there is none: not Linux, or no such field)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """Which of :data:`_CPU_FEATURES` the CPU has (Linux /proc/cpuinfo flags; empty elsewhere)."""
    have = set((_cpuinfo("flags") or "").split())
    return [f for f in _CPU_FEATURES if f in have]


def environment() -> dict[str, Any]:
    """Package versions, python, platform, CPU and git revision, written beside every result."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
        "git_revision": git_revision(),
    }


class Stage:
    """One cached stage directory: ``<root>/stages/<name>-<key[:16]>``.

    Processes sharing a run directory (or a cache) coordinate through :meth:`claim`: an OS file lock per stage,
    held from the claim until :meth:`finish` (or :meth:`release`), and released by the OS if its holder dies,
    so a second process waits for the stage (or skips it) and then reuses the result instead of redoing it
    or writing into it at the same time."""

    def __init__(self, root: str | Path, name: str, config: Any, inputs: dict[str, str] | None = None) -> None:
        self.name = name
        self.config = config
        self.inputs = dict(inputs or {})
        self.key = hash_obj({"stage": name, "config": config, "inputs": self.inputs})
        self.dir = Path(root) / "stages" / f"{name}-{self.key[:16]}"
        self._lock: int | None = None

    @property
    def done(self) -> bool:
        """Finished, and every file it finished with still has the size and SHA-256 its ``_DONE`` marker
        recorded. A stage whose files were truncated, edited or deleted since is moved to ``<root>/.corrupt/``
        (kept, not deleted) with a one-line notice on stderr, and counts as not done: it is recomputed."""
        marker = self.dir / DONE
        if not marker.exists():
            return False
        bad = _check_files(self.dir, marker)
        if bad is None:
            return True
        dest = self.dir.parent.parent / ".corrupt" / f"{self.dir.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.dir, dest)
        except OSError as e:
            raise StageCorrupt(f"stage {self.dir}: {bad}, and it cannot be moved aside ({e})") from None
        print(f"sublim: stage {self.dir.name}: {bad}; moved to {dest} and recomputed", file=sys.stderr, flush=True)
        return False

    @property
    def lock_path(self) -> Path:
        """``<root>/.locks/<stage dir name>.lock``: beside ``stages/``, so listings of the stages see only stages."""
        return self.dir.parent.parent / ".locks" / f"{self.dir.name}.lock"

    def claim(self, wait: bool = True) -> bool | None:
        """Take the stage for this process. True: it is not finished and this process now holds it (do the work,
        then :meth:`finish`); False: it is finished (perhaps by another process while this one waited); None
        (only with ``wait=False``): another process, or this one through another :class:`Stage`, holds it."""
        import fcntl

        if self.done:
            return False
        if self._lock is not None:
            return True
        path = str(self.lock_path)
        if path in _HELD:  # flock would wait on this very process forever
            if wait:
                raise RuntimeError(f"stage {self.dir.name} is already claimed by this process")
            return None
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        if self.done:  # finished by the holder we waited for
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            return False
        self._lock = fd
        _HELD[path] = fd
        self.start()
        return True

    def release(self) -> None:
        """Give the stage up unfinished (its partial work stays for the next claim to resume or redo)."""
        if self._lock is not None and _HELD.get(str(self.lock_path)) == self._lock:
            _unlock(str(self.lock_path))
        self._lock = None

    def start(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "stage.json", {"stage": self.name, "key": self.key,
                                                     "config": self.config, "inputs": self.inputs})
        return self.dir

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if summary is not None:
            atomic_write_json(self.dir / "summary.json", summary)
        sweep_leftovers_under(self.dir)  # a killed writer's temp file must not be listed, then swept by the write
        atomic_write_json(self.dir / DONE, {"files": _file_hashes(self.dir)})
        self.release()

    def summary(self) -> dict[str, Any]:
        p = self.dir / "summary.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def relative(self, model: dict[str, Any]) -> dict[str, Any]:
        """A model spec (as a dict) with the paths that lie inside this stage made relative to it, for a summary
        that stays true when the run directory moves; :meth:`absolute` undoes it."""
        out = dict(model)
        for k in ("path", "adapter"):
            v = out.get(k)
            if v and Path(v).is_absolute() and Path(v).resolve().is_relative_to(self.dir.resolve()):
                out[k] = str(Path(v).resolve().relative_to(self.dir.resolve()))
                out.setdefault("_in_stage", []).append(k)
        return out

    def absolute(self, model: dict[str, Any]) -> dict[str, Any]:
        out = dict(model)
        for k in out.pop("_in_stage", []):
            out[k] = str(self.dir / out[k])
        return out


class StageCorrupt(RuntimeError):
    """A finished stage whose files no longer match their recorded hashes and cannot be moved aside."""


def _file_hashes(d: Path) -> dict[str, list[Any]]:
    """{relative path: [size, sha256]} of every file under a stage directory but its marker and atomic writes'
    temp files (content only once renamed into place)."""
    out: dict[str, list[Any]] = {}
    for f in sorted(d.rglob("*")):
        if f.is_file() and f.name != DONE and not _is_temp(f.relative_to(d).as_posix()):
            st = f.stat()
            out[f.relative_to(d).as_posix()] = [st.st_size, _sha256_cached(str(f), st.st_size, st.st_mtime_ns)]
    return out


def _is_temp(rel: str) -> bool:
    return any(is_temp_name(part) for part in rel.split("/"))


def _check_files(d: Path, marker: Path) -> str | None:
    """None when the stage's files match its marker (an empty marker, from before markers held hashes, is
    trusted); else what differs, in a few words."""
    text = marker.read_text()
    if not text.strip():
        return None
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {DONE} marker is unreadable"
    for rel, (size, digest) in files.items():
        if _is_temp(rel):  # listed by markers written before temp files were left out; never content
            continue
        f = d / rel
        if not f.is_file():
            return f"{rel} is missing"
        st = f.stat()
        if st.st_size != size:
            return f"{rel} is {st.st_size} bytes, {size} when the stage finished"
        if _sha256_cached(str(f), st.st_size, st.st_mtime_ns) != digest:
            return f"{rel} does not match the SHA-256 recorded when the stage finished"
    return None


@lru_cache(maxsize=4096)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


_HELD: dict[str, int] = {}  # lock path -> fd of the stage locks this process holds (flock is per open file)


def _unlock(path: str) -> None:
    import fcntl

    fd = _HELD.pop(path)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def release_held() -> None:
    """Release every stage lock this process holds: a command that stops on an error calls it, so a retry in
    the same process (a sweep cell, a test) can claim the unfinished stages again."""
    for path in list(_HELD):
        _unlock(path)
