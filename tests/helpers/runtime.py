"""What an engine process has loaded of services/inference/runtime.py's preloads."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from services.inference import runtime

NEEDS_PRELOADS = pytest.mark.skipif(
    not runtime.preloads(), reason="neither tcmalloc nor Intel's OpenMP is installed here: nothing to preload"
)


def missing_preloads(pid: int) -> list[str]:
    """The libraries runtime.preloads finds that process `pid` has not mapped (a soname matches its versions)."""
    names = {Path(m.path).name for m in psutil.Process(pid).memory_maps()}
    stems = [(library, Path(library).name.split(".so")[0] + ".so") for library in runtime.preloads()]
    return [library for library, stem in stems if not any(n.startswith(stem) for n in names)]
