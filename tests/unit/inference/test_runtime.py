"""The engine processes' native runtime: which libraries are preloaded, and how LD_PRELOAD is composed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.inference import runtime
from tests.helpers.runtime import NEEDS_PRELOADS, missing_preloads


def test_preloads_go_first_and_what_the_environment_names_is_kept() -> None:
    env = {"LD_PRELOAD": "libother.so /x/libiomp5.so", "PATH": "/bin"}
    merged = runtime.with_preloads(env, ["libtcmalloc_minimal.so.4", "/x/libiomp5.so"])
    assert merged["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:/x/libiomp5.so:libother.so"
    assert merged["PATH"] == "/bin" and env["LD_PRELOAD"] == "libother.so /x/libiomp5.so"
    assert "LD_PRELOAD" not in runtime.with_preloads({}, [])


@NEEDS_PRELOADS
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_a_process_starts_itself_again_with_the_preloads_once(tmp_path: Path) -> None:
    """The same process (pid) runs on with every found library mapped, and does not start a third time."""
    script = tmp_path / "child.py"
    script.write_text(
        "import os, sys\n"
        "from services.inference import runtime\n"
        "print('start', os.getpid(), flush=True)\n"
        "runtime.reexec_with_preloads()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", runtime.MARK)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[3])
    child = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        lines = [child.stdout.readline() for _ in range(3)]
        starts = [line for line in lines if line.startswith("start")]
        assert len(starts) == 2 and starts[0] == starts[1] and lines[2] == "ready\n", lines  # twice, one process
        assert missing_preloads(child.pid) == []
    finally:
        child.communicate("")
    assert child.returncode == 0
