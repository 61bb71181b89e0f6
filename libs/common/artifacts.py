"""The artifact store: a root directory of tokenisers, corpora, checkpoints and models in open formats.

Every id resolves strictly inside the root: no absolute paths, no `..`, no symlink that leads
out. Writes are staged in a private directory and moved into place with one rename, so a reader
never sees half an artifact and a failed write leaves nothing behind. Before that rename every
file and folder of the staged tree is flushed to disk (fsync), and after it the folder that now
holds the artifact, so an artifact that was reported written survives a power cut whole. Versioned artifacts live
at `<kind>/<name>/<version>/`, addressed as "name" (latest), "name:latest" or "name:<version>".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from libs.common.errors import AlreadyExists, InvalidArgument, NotFound

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # the whole name (fullmatch: no trailing newline)
MAX_PATH_CHARS = 1024


def check_name(name: str, field: str = "name") -> str:
    if not NAME_RE.fullmatch(name or "") or ".." in name:
        raise InvalidArgument(
            f"{name!r} is not a valid name (letters, digits, '.', '_', '-'; at most 128; no '..')", field=field
        )
    return name


@dataclass(frozen=True)
class Ref:
    name: str
    version: int
    path: Path

    @property
    def id(self) -> str:
        return f"{self.name}:{self.version}"


class ArtifactStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".staging").mkdir(exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)

    # -- paths -------------------------------------------------------------------------------
    def path(self, relative: str | os.PathLike[str], *, field: str = "path") -> Path:
        """Resolve a user-given relative path inside the root, refusing any escape."""
        raw = str(relative)
        if not raw or "\x00" in raw:
            raise InvalidArgument("empty or invalid path", field=field)
        rel = Path(raw)
        if len(raw) > MAX_PATH_CHARS or any(len(part.encode()) > 255 for part in rel.parts):
            raise InvalidArgument(f"longer than {MAX_PATH_CHARS} characters, or a part of over 255 bytes", field=field)
        if rel.is_absolute() or ".." in rel.parts:
            raise InvalidArgument(f"{raw!r} must be relative to the artifact store, without '..'", field=field)
        if rel.parts and rel.parts[0] in (".staging", ".locks"):
            raise InvalidArgument(f"{raw!r} is not an artifact", field=field)
        resolved = (self.root / rel).resolve()
        if not resolved.is_relative_to(self.root):
            raise InvalidArgument(f"{raw!r} leads outside the artifact store", field=field)
        return resolved

    def relative(self, path: Path) -> str:
        return str(path.resolve().relative_to(self.root))

    # -- atomic writes -----------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self, relative: str, *, replace: bool = False) -> Iterator[Path]:
        """Yield an empty directory; on success it becomes `relative` in one rename, else vanishes."""
        final = self.path(relative)
        tmp = self.root / ".staging" / uuid.uuid4().hex
        tmp.mkdir()
        try:
            yield tmp
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                if not replace:
                    raise AlreadyExists(f"{relative} already exists")
                self._remove(final)
            fsync_tree(tmp)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _remove(self, path: Path) -> None:
        trash = self.root / ".staging" / f"trash-{uuid.uuid4().hex}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def delete(self, relative: str) -> None:
        target = self.path(relative)
        if not target.exists():
            raise NotFound(f"{relative} does not exist")
        self._remove(target)

    def lock(self, key: str) -> FileLock:
        """A lock shared by every process using this store (see FileLock)."""
        return FileLock(self.root / ".locks" / (re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".lock"), key)

    # -- versioned artifacts -------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        base = self.root / kind
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and self.versions(kind, p.name))

    def versions(self, kind: str, name: str) -> list[int]:
        base = self.root / kind / name
        if not base.is_dir():
            return []
        return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())

    def next_version(self, kind: str, name: str) -> int:
        versions = self.versions(kind, name)
        return versions[-1] + 1 if versions else 1

    def resolve(self, kind: str, ref: str, *, field: str = "ref") -> Ref:
        """'name', 'name:latest' or 'name:<version>' -> the version's directory."""
        name, _, version = (ref or "").partition(":")
        check_name(name, field)
        versions = self.versions(kind, name)
        if not versions:
            raise NotFound(f"no {kind[:-1] if kind.endswith('s') else kind} named {name!r}", field=field)
        if version in ("", "latest"):
            chosen = versions[-1]
        elif version.isdigit() and int(version) in versions:
            chosen = int(version)
        else:
            raise NotFound(f"{name!r} has no version {version!r} (versions: {versions})", field=field)
        return Ref(name, chosen, self.path(f"{kind}/{name}/{chosen}", field=field))


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then every folder from the deepest up, `root` last."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


class FileLock:
    """An exclusive flock on a file: held across processes and by one holder in this process."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        self._fh: IO[str] | None = None

    def acquire(self, blocking: bool = False) -> FileLock:
        """Take the lock; when not blocking, a held lock raises AlreadyExists."""
        fh = open(self.path, "w")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            raise AlreadyExists(f"{self.key} is being written by another job") from None
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> FileLock:
        return self.acquire(blocking=True)

    def __exit__(self, *exc: object) -> None:
        self.release()
