"""A replica's ModelServer in a process of its own, where nothing else takes the engine's GIL.

A Ray Serve replica's process runs more than our code: Ray's core-worker threads, its serialisation
pool and Serve's request handling all take the GIL, many times a second. The engine's step thread
gives the GIL up at every torch operation and must then wait for it, and each hand-over costs it a
switch: in one process, a thread that woke every millisecond for 0.1 ms of Python made a 16-row
decode step of the bench's small model 13% slower (9% more CPU time), and in a replica the same
engine's decode steps ran 6-9% slower than in a process of its own. `ModelProcess` therefore runs the
replica's `ModelServer` in a child process (`python -m services.inference.engine_process`), started
with the replica's environment (so its preloads and thread settings), and talks to it over a socket
pair:

    server = await ModelProcess.start(spec, artifacts_root, limits, replica_id, messages_per_second=200)
    async for chunk in server.generate(request): ...     # as ModelServer.generate
    server.stats(); server.check_health(); server.close()

Each message is one pickled frame (a length, then the pickle): requests and closes go in, chunks,
ends and stats replies come back. The child's event loop does only this, so its step thread meets
the GIL taken only by requests coming in and chunks going out.

The child lives as long as its end of the socket: when the replica's process ends, however it ends,
the child reads the end of the stream and exits. A child that dies ends the requests it held with
an error and makes `check_health` fail, so Serve replaces the replica; so does an engine failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from libs.common.errors import LlmpError, Unavailable
from services.inference.engine import SamplingLimits
from services.inference.schema import Chunk, GenerateInput, ModelSpec, ReplicaStats

log = logging.getLogger(__name__)

HEADER = struct.Struct("!I")
STATS_TIMEOUT_SECONDS = 5.0
STOP_SECONDS = 10.0
"""How long a closed ModelProcess waits for its child to exit before killing it."""


def frame(message: Any) -> bytes:
    """`message` as one frame; an error that cannot be pickled goes as a RuntimeError naming it."""
    try:
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        body = pickle.dumps(tuple(_picklable(part) for part in message), protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def _picklable(part: Any) -> Any:
    if isinstance(part, BaseException):
        try:
            pickle.dumps(part)
        except Exception:
            return RuntimeError(repr(part))
    return part


async def read_message(reader: asyncio.StreamReader) -> Any:
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    return pickle.loads(await reader.readexactly(size))


@dataclass(frozen=True)
class _End:
    """A request's end in the child: its error, or None when its last chunk went out."""

    error: BaseException | None


class ModelProcess:
    """The parent's side: ModelServer's interface (generate, stats, check_health), served by the child."""

    def __init__(
        self, proc: subprocess.Popen[bytes], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proc, self.reader, self.writer = proc, reader, writer
        self.loop = asyncio.get_running_loop()
        self.replica_id = ""
        self.load_seconds = 0.0
        self.failure: BaseException | None = None
        self._ids = itertools.count()
        self._inboxes: dict[int, asyncio.Queue[Chunk | _End]] = {}
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._reading: asyncio.Task[None] | None = None
        self._closed = threading.Event()

    @classmethod
    async def start(
        cls,
        spec: ModelSpec,
        artifacts_root: str,
        limits: SamplingLimits,
        replica_id: str = "",
        *,
        messages_per_second: float = 0.0,
    ) -> ModelProcess:
        """Start the child and load the model there; a load error (bad options, a broken folder) is raised here."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # the child imports this package as this process does, from the same places
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        argv = [sys.executable, "-m", "services.inference.engine_process", str(theirs.fileno())]
        proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        server = cls(proc, reader, writer)
        try:
            writer.write(frame(("load", spec, artifacts_root, limits, replica_id, messages_per_second)))
            try:
                reply = await read_message(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                code = await asyncio.to_thread(proc.wait)
                raise Unavailable(f"the engine process exited with code {code} while loading the model") from None
            if reply[0] == "failed":
                raise reply[1]
            _, server.replica_id, server.load_seconds = reply
        except BaseException:
            server.close()
            raise
        server._reading = asyncio.create_task(server._read())
        return server

    async def _read(self) -> None:
        """Hand the child's messages to their requests and replies, until the child's end."""
        try:
            while True:
                kind, key, value = await read_message(self.reader)
                if kind == "chunk" or kind == "end":
                    inbox = self._inboxes.get(key)
                    if inbox is not None:  # else closed by its caller meanwhile
                        inbox.put_nowait(value if kind == "chunk" else _End(value))
                    if kind == "end" and value is not None and not isinstance(value, LlmpError):
                        self.failure = value  # the engine failed: the replica reports unhealthy
                else:
                    reply = self._replies.pop(key, None)
                    if reply is not None and not reply.done():
                        reply.set_result(value)
        except (asyncio.IncompleteReadError, OSError) as e:  # OSError: a reset socket too
            if not self._closed.is_set():
                code = self.proc.poll()
                self.failure = RuntimeError(f"the engine process ended (exit code {code}): {e!r}")
                log.error("%s", self.failure)
        finally:
            ended = Unavailable("the replica's engine process ended")
            for inbox in self._inboxes.values():
                inbox.put_nowait(_End(ended))
            for reply in self._replies.values():
                if not reply.done():
                    reply.set_exception(ended)

    def _send(self, message: Any) -> None:
        if self._reading is None or self._reading.done():
            raise Unavailable("the replica's engine process has ended")
        self.writer.write(frame(message))

    async def generate(self, request: GenerateInput) -> AsyncGenerator[Chunk, None]:
        """ModelServer.generate in the child; closing this early closes it there, which aborts the request."""
        key = next(self._ids)
        inbox = self._inboxes[key] = asyncio.Queue()
        ended = False
        try:
            self._send(("generate", key, request))
            while True:
                item = await inbox.get()
                if isinstance(item, _End):
                    ended = True
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            del self._inboxes[key]
            if not ended and not self._closed.is_set():
                with contextlib.suppress(LlmpError):
                    self._send(("close", key, None))

    def stats(self) -> ReplicaStats:
        """The child's load; from any thread but the event loop's (the replica's report thread)."""
        return asyncio.run_coroutine_threadsafe(self._ask("stats"), self.loop).result(STATS_TIMEOUT_SECONDS)

    async def _ask(self, kind: str) -> Any:
        key = next(self._ids)
        reply = self._replies[key] = self.loop.create_future()
        try:
            self._send((kind, key, None))
            return await reply
        finally:
            self._replies.pop(key, None)

    def check_health(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"the engine process exited with code {code}")
        if self.failure is not None:
            raise RuntimeError(f"the engine failed: {self.failure!r}")

    def close(self) -> None:
        """Stop the child (it exits at the end of its socket; killed if it has not within STOP_SECONDS)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):  # at once: the transport's own close waits for the loop's next turn
            self.writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        self.writer.close()
        try:
            self.proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the child --------------------------------------------------------------------------------------
async def _serve(fd: int) -> None:
    """Load the model the first message names, then serve requests until the parent's end of the socket."""
    from libs.common.artifacts import ArtifactStore
    from libs.common.service import freeze_heap
    from services.inference.model_server import ModelServer

    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    _, spec, root, limits, replica_id, rate = await read_message(reader)
    try:
        server = await asyncio.to_thread(
            ModelServer, spec, ArtifactStore(root), limits, replica_id, messages_per_second=rate
        )
    except Exception as e:
        writer.write(frame(("failed", e)))
        await writer.drain()
        return
    freeze_heap()  # the loaded model and libraries stay out of the collector's walks
    writer.write(frame(("loaded", server.replica_id, server.load_seconds)))
    running: dict[int, asyncio.Task[None]] = {}

    async def run(key: int, request: GenerateInput) -> None:
        error: BaseException | None = None
        try:
            async with contextlib.aclosing(server.generate(request)) as chunks:
                async for chunk in chunks:
                    writer.write(frame(("chunk", key, chunk)))
        except asyncio.CancelledError:
            return  # closed by the parent, which has forgotten it
        except Exception as e:
            error = e
        finally:
            running.pop(key, None)
        writer.write(frame(("end", key, error)))

    while True:
        try:
            kind, key, value = await read_message(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            break  # the parent has gone
        if kind == "generate":
            running[key] = asyncio.create_task(run(key, value))
        elif kind == "close":
            task = running.get(key)
            if task is not None:
                task.cancel()
        elif kind == "stats":
            writer.write(frame(("stats", key, server.stats())))
    for task in list(running.values()):
        task.cancel()


def main() -> None:
    from libs.common import logs
    from libs.common.config import CommonConfig, load

    common = load(CommonConfig, "common")
    logs.setup("inference", common.log_level, common.log_format)
    asyncio.run(_serve(int(sys.argv[1])))
    os._exit(0)  # the engine's step thread (a daemon) may be parked: nothing is left to wait for


if __name__ == "__main__":
    main()
