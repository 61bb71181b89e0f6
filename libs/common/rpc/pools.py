"""Where a servicer's blocking work runs: quick calls share one pool, slow calls have their own.

Servicers run blocking work (model inference, Redis, file reads) in threads so the event loop
keeps serving. Some methods are slow by nature: watches that block on Redis for a second at a
time until a job ends, reports that train tokenisers, imports and ingests. Were they in the pool
every call uses, a handful of watches would occupy its threads and a cheap Describe would wait
behind them. So each service names its slow methods (`SLOW_METHODS` on the servicer), and the
server kit runs them apart:

- at most `max_slow_calls` slow calls are in flight; one more is RESOURCE_EXHAUSTED at once,
  so they never take the last of `max_concurrent_rpcs` either;
- their blocking work runs in a pool of `max_slow_calls` threads of its own, so every admitted
  slow call gets a thread and none takes one from the quick calls.

    await run_blocking(core.describe, name)   # in a servicer method, in place of asyncio.to_thread

`run_blocking` picks the pool of the call in progress (the interceptor sets it); outside a call
it uses the event loop's default pool, so cores keep working in-process.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

from libs.common.errors import ResourceExhausted

T = TypeVar("T")

#: The pool of the current call's blocking work; None: the event loop's default pool.
current_pool: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("llmp_pool", default=None)


async def run_blocking(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a worker thread of the current call's pool, with this context's variables."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    return await loop.run_in_executor(current_pool.get(), functools.partial(context.run, fn, *args, **kwargs))


class SlowCalls:
    """Admission and threads for a server's slow methods. Used from the event loop's thread only."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("max_slow_calls must be at least 1")
        self.limit = limit
        self.in_flight = 0
        self.pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="llmp-slow")

    def admit(self, method: str) -> None:
        """Count one more slow call in, or refuse it when `limit` are already in flight."""
        if self.in_flight >= self.limit:
            raise ResourceExhausted(
                f"{self.in_flight} slow calls ({method} and the like) are in progress; retry later", retry_after=5
            )
        self.in_flight += 1
        current_pool.set(self.pool)

    def release(self) -> None:
        self.in_flight -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
