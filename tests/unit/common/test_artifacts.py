from __future__ import annotations

import os
from pathlib import Path

import pytest

from libs.common.artifacts import ArtifactStore, check_name
from libs.common.errors import AlreadyExists, InvalidArgument, NotFound


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/passwd", "a/../../b", "", "a\x00b", ".staging/x"])
def test_paths_never_leave_the_root(store: ArtifactStore, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        store.path(bad)


def test_symlink_escape_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, store.root / "link")
    with pytest.raises(InvalidArgument, match="outside"):
        store.path("link/secret.txt")
    (store.root / "inside").mkdir()
    os.symlink(store.root / "inside", store.root / "ok-link")
    assert store.path("ok-link/file") == store.root / "inside" / "file"


@pytest.mark.parametrize("bad", ["", "..", "a/b", "-x", "x" * 200, "a..b"])
def test_names_are_checked(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        check_name(bad)


def test_staging_is_all_or_nothing(store: ArtifactStore) -> None:
    with pytest.raises(RuntimeError), store.staging("models/m/1") as tmp:
        (tmp / "weights.safetensors").write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert not (store.root / "models" / "m" / "1").exists()
    assert list((store.root / ".staging").iterdir()) == []
    with store.staging("models/m/1") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (store.root / "models/m/1/config.json").read_text() == "{}"
    with pytest.raises(AlreadyExists), store.staging("models/m/1"):
        pass


def test_versions_and_references(store: ArtifactStore) -> None:
    for version in (1, 2, 10):
        with store.staging(f"tokenizers/t/{version}"):
            pass
    assert store.versions("tokenizers", "t") == [1, 2, 10]
    assert store.next_version("tokenizers", "t") == 11
    assert store.resolve("tokenizers", "t").version == 10
    assert store.resolve("tokenizers", "t:latest").version == 10
    assert store.resolve("tokenizers", "t:2").id == "t:2"
    with pytest.raises(NotFound, match="no version '3'"):
        store.resolve("tokenizers", "t:3")
    with pytest.raises(NotFound):
        store.resolve("tokenizers", "missing")


def test_lock_is_exclusive(store: ArtifactStore) -> None:
    held = store.lock("job").acquire()
    with pytest.raises(AlreadyExists):
        store.lock("job").acquire()
    held.release()
    store.lock("job").acquire().release()


def test_delete(store: ArtifactStore) -> None:
    with store.staging("corpora/c"):
        pass
    store.delete("corpora/c")
    assert not (store.root / "corpora" / "c").exists()
    with pytest.raises(NotFound):
        store.delete("corpora/c")


def test_staging_flushes_every_file_and_folder_around_the_rename(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each staged file and folder is fsynced before the rename, the receiving folder after it."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with store.staging("models/m/1") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "sub" / "model.safetensors").write_bytes(b"weights")
    staged = str(tmp)
    final = str(store.root / "models" / "m" / "1")
    rename = events.index(("rename", final))
    before = {path for kind, path in events[:rename] if kind == "fsync"}
    assert before == {
        f"{staged}/config.json",
        f"{staged}/sub/model.safetensors",
        f"{staged}/sub",
        staged,
    }
    assert events[rename + 1 :] == [("fsync", str(store.root / "models" / "m"))]
