"""Training job state in Redis: one hash per job, a sorted-set index, and an event stream per job.

    llmp:training:job:<id>       hash: type, state, config (JSON), progress (JSON), metrics (JSON), ...
    llmp:training:jobs           sorted set of job ids, scored by creation time
    llmp:training:token:<token>  the job id a client token created (idempotent submission)
    llmp:training:events:<id>    stream of {kind: state | progress | log, data: JSON}, read by WatchJob

Creation and every state change are single Lua scripts, so two callers never both win a race
(two submissions with one token, a cancel against a finish) and a watcher sees each state change
exactly once, in order. With Redis' append-only file the whole state outlives a restart of Redis
and of the service. Workers write progress and read the stop request through the same class.

Redis itself failing (unreachable, refusing, out of memory) is Unavailable (gRPC UNAVAILABLE),
never taken for a job's state: a caller can tell "try again" from "not allowed".
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

import redis

from libs.common.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable

P = ParamSpec("P")
R = TypeVar("R")

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({PENDING, RUNNING})

#: For each state, the states a job may enter it from.
ALLOWED_FROM: dict[str, frozenset[str]] = {
    PENDING: frozenset({RUNNING, FAILED, CANCELLED}),  # lost and resumed, or resumed by the user
    RUNNING: frozenset({PENDING}),
    SUCCEEDED: frozenset({RUNNING}),
    FAILED: frozenset({PENDING, RUNNING}),
    CANCELLED: frozenset({PENDING, RUNNING}),
}

#: Why a running job should stop: the user cancelled it, or the service is shutting down.
CANCEL, PREEMPT = "cancel", "preempt"

PREFIX = "llmp:training"
EVENTS_KEPT = 10_000

# KEYS: token key ("" when none), job hash, index, events. ARGV: job id, score, event JSON, field/value pairs.
_CREATE = """
if KEYS[1] ~= '' then
  local existing = redis.call('GET', KEYS[1])
  if existing then return existing end
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[4], '*', 'kind', 'state', 'data', ARGV[3])
return ARGV[1]
"""

# KEYS: job hash, events. ARGV: new state, allowed previous states (JSON list), event JSON, field/value pairs.
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {err = 'NOT_FOUND'} end
local allowed = cjson.decode(ARGV[2])
for _, from in ipairs(allowed) do
  if from == state then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], unpack(ARGV, 4))
    redis.call('XADD', KEYS[2], '*', 'kind', 'state', 'data', ARGV[3])
    return state
  end
end
return {err = 'STATE ' .. state}
"""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class JobRecord:
    """One job as stored; `progress` and `metrics` are plain dicts of numbers."""

    job_id: str
    type: str
    config: dict[str, Any]
    backend: str
    state: str = PENDING
    client_token: str = ""
    reason: str = ""
    progress: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str = ""
    model: str = ""
    dataset: str = ""
    attempts: int = 0
    created_at: str = ""
    started_at: str = ""
    finished_at: str = ""
    stop: str = ""

    _JSON = ("config", "progress", "metrics")

    def to_hash(self) -> dict[str, str]:
        out = {}
        for name, value in self.__dict__.items():
            out[name] = json.dumps(value) if name in self._JSON else str(value)
        return out

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> JobRecord:
        values: dict[str, Any] = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        for name in cls._JSON:
            values[name] = json.loads(values.get(name) or "{}")
        values["attempts"] = int(values.get("attempts") or 0)
        return cls(**values)


@dataclass(frozen=True)
class Event:
    """One entry of a job's event stream."""

    id: str
    kind: str
    data: Any


def redis_unavailable(method: Callable[P, R]) -> Callable[P, R]:
    """Turn a Redis failure inside `method` into Unavailable, naming the operation."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except redis.RedisError as e:
            raise Unavailable(f"Redis is unavailable ({method.__name__}): {type(e).__name__}: {e}") from e

    return call


def _pairs(fields: dict[str, str]) -> list[str]:
    return [x for item in fields.items() for x in item]


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        # Built with decode_responses=True, so replies are str, which redis-py's stubs cannot express.
        self.redis: Any = client
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True, health_check_interval=30))

    @classmethod
    def from_env(cls) -> JobStore:
        """The store of the Redis this process's environment names (LLMP_REDIS_URL, else the local
        stack's with its password from LLMP_HOME): how Ray Train workers connect, so that the URL and
        its password never travel in a job's config, which Ray's dashboard shows."""
        from libs.common import config as cfg
        from libs.common.config import CommonConfig
        from libs.common.secrets import redis_url

        return cls.from_url(redis_url(cfg.load(CommonConfig, "common")))

    @staticmethod
    def _key(job_id: str) -> str:
        return f"{PREFIX}:job:{job_id}"

    @staticmethod
    def _events_key(job_id: str) -> str:
        return f"{PREFIX}:events:{job_id}"

    # -- creation and lookup -----------------------------------------------------------------
    @redis_unavailable
    def create(
        self, job_type: str, config: dict[str, Any], backend: str, client_token: str = ""
    ) -> tuple[JobRecord, bool]:
        """(a new PENDING job, True), or (the job `client_token` already created, False): same type and config only."""
        job = JobRecord(f"train-{uuid.uuid4().hex[:12]}", job_type, config, backend, client_token=client_token)
        job.created_at = now()
        token_key = f"{PREFIX}:token:{client_token}" if client_token else ""
        event = json.dumps({"state": PENDING, "reason": "submitted"})
        keys = [token_key, self._key(job.job_id), f"{PREFIX}:jobs", self._events_key(job.job_id)]
        winner = self._create(keys=keys, args=[job.job_id, time.time(), event, *_pairs(job.to_hash())])
        if winner == job.job_id:
            return job, True
        existing = self.get(winner)
        if (existing.type, existing.config) != (job_type, config):
            raise AlreadyExists(f"{client_token!r} was used for a different job ({winner})", field="client_token")
        return existing, False

    @redis_unavailable
    def get(self, job_id: str) -> JobRecord:
        raw = self.redis.hgetall(self._key(job_id)) if job_id else {}
        if not raw:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return JobRecord.from_hash(raw)

    @redis_unavailable
    def list_jobs(self, state: str = "", job_type: str = "", limit: int = 100) -> list[JobRecord]:
        """Newest first, filtered by state and type."""
        out: list[JobRecord] = []
        for job_id in self.redis.zrevrange(f"{PREFIX}:jobs", 0, -1):
            raw = self.redis.hgetall(self._key(job_id))
            if not raw:
                continue
            job = JobRecord.from_hash(raw)
            if (not state or job.state == state) and (not job_type or job.type == job_type):
                out.append(job)
                if len(out) >= limit:
                    break
        return out

    def active(self) -> list[JobRecord]:
        return [j for j in self.list_jobs(limit=1 << 30) if j.state in ACTIVE]

    # -- state changes -----------------------------------------------------------------------
    @redis_unavailable
    def transition(self, job_id: str, to: str, reason: str = "", **fields: Any) -> str:
        """Move a job to state `to` if ALLOWED_FROM permits; returns the state it left."""
        values = {"reason": reason, **{k: str(v) for k, v in fields.items()}}
        if to in FINAL:
            values["finished_at"] = now()
        if to == RUNNING:
            values["started_at"] = now()
        if to == PENDING:
            values["stop"] = ""
        event = json.dumps({"state": to, "reason": reason})
        allowed = json.dumps(sorted(ALLOWED_FROM[to]))
        try:
            return str(
                self._transition(
                    keys=[self._key(job_id), self._events_key(job_id)], args=[to, allowed, event, *_pairs(values)]
                )
            )
        except redis.ResponseError as e:  # the script's own answers; any other error is Redis failing
            if str(e) == "NOT_FOUND":
                raise NotFound(f"no job {job_id!r}", field="job_id") from None
            if str(e).startswith("STATE "):
                state = str(e).removeprefix("STATE ")
                raise FailedPrecondition(f"job {job_id} is {state}; it cannot become {to}", field="job_id") from None
            raise

    @redis_unavailable
    def start_attempt(self, job_id: str) -> int:
        """Count one more start of the job; returns the new count."""
        return int(self.redis.hincrby(self._key(job_id), "attempts", 1))

    @redis_unavailable
    def request_stop(self, job_id: str, why: str) -> None:
        self.redis.hset(self._key(job_id), "stop", why)

    @redis_unavailable
    def stop_requested(self, job_id: str) -> str:
        """'' while the job should keep going, else CANCEL or PREEMPT."""
        return str(self.redis.hget(self._key(job_id), "stop") or "")

    # -- progress, results and logs ----------------------------------------------------------
    @redis_unavailable
    def update(self, job_id: str, **fields: Any) -> None:
        """Set plain fields (checkpoint, model, dataset) or the JSON ones (metrics) of a job."""
        values = {k: json.dumps(v) if k in JobRecord._JSON else str(v) for k, v in fields.items()}
        self.redis.hset(self._key(job_id), mapping=values)

    @redis_unavailable
    def report_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        data = json.dumps(progress)
        pipe = self.redis.pipeline()
        pipe.hset(self._key(job_id), "progress", data)
        pipe.xadd(self._events_key(job_id), {"kind": "progress", "data": data}, maxlen=EVENTS_KEPT)
        pipe.execute()

    @redis_unavailable
    def log(self, job_id: str, line: str) -> None:
        self.redis.xadd(self._events_key(job_id), {"kind": "log", "data": json.dumps(line)}, maxlen=EVENTS_KEPT)

    @redis_unavailable
    def events(self, job_id: str, after: str = "0", block_ms: int | None = None) -> list[Event]:
        """Events after id `after`; with `block_ms`, wait up to that long for the first one."""
        found = self.redis.xread({self._events_key(job_id): after}, block=block_ms)
        return [Event(eid, f["kind"], json.loads(f["data"])) for _, entries in found or [] for eid, f in entries]
