"""A job type (group llmp.objectives) and an inference engine (group llmp.engines) from a third party."""

from __future__ import annotations

from typing import Any


class InstantJob:
    """A job type that accepts any config and is done as soon as it runs."""

    def check(self, config: dict[str, Any], context: Any) -> dict[str, Any]:
        return {**config, "checked_by": "instant"}

    def run(self, job: Any, context: Any) -> str:
        return "done"


def in_process(config: Any, store: Any) -> Any:
    """An engine that serves models in this process: the built-in local backend under another name."""
    from services.inference.backends import local_backend

    return local_backend(config, store)
