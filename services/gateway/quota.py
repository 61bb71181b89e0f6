"""Per-key request-rate and token quotas in Redis, atomic across gateway replicas.

Each key has two token buckets, refilled continuously at limit/60 per second up to `limit`:
requests (one per call) and tokens (prompt + completion, charged when a call ends, since only
then are they known). One Lua script reads the clock from Redis (TIME, so replicas need not
agree on theirs), refills both buckets and admits or charges in one step, so two replicas can
never both spend the last unit. A call is admitted while its request bucket holds a whole
request and its token bucket is above zero; a call that ran over leaves the token bucket in
debt, and the key waits until it refills. A refused call learns how long to wait (Retry-After).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from libs.common.errors import ResourceExhausted
from services.gateway.keys import PREFIX, KeyRecord

# KEYS: request bucket, token bucket. ARGV: requests/min, tokens/min (0: unlimited), request cost,
# token cost, "1" to admit (refuse when short) or "0" to charge unconditionally.
# Returns {admitted (0/1), retry after in ms, which bucket was short}.
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, limit)
  if limit <= 0 then return nil end
  local v = redis.call('HMGET', key, 'level', 'ts')
  local lvl = tonumber(v[1]) or limit
  local ts = tonumber(v[2]) or now
  return math.min(limit, lvl + math.max(0, now - ts) * limit / 60)
end
local function store(key, lvl)
  redis.call('HSET', key, 'level', tostring(lvl), 'ts', tostring(now))
  redis.call('PEXPIRE', key, 3600000)
end
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local rcost, tcost = tonumber(ARGV[3]), tonumber(ARGV[4])
local r = level(KEYS[1], rpm)
local k = level(KEYS[2], tpm)
if ARGV[5] == '1' then
  if r and r < rcost then return {0, math.ceil((rcost - r) * 60000 / rpm), 'requests'} end
  if k and k <= 0 then return {0, math.ceil((1 - k) * 60000 / tpm), 'tokens'} end
end
if r then store(KEYS[1], r - rcost) end
if k then store(KEYS[2], k - tcost) end
return {1, 0, ''}
"""


@dataclass
class Quotas:
    """The buckets of every key (redis.asyncio client, decode_responses=True) and the default limits."""

    redis: Any
    requests_per_minute: int
    tokens_per_minute: int

    def __post_init__(self) -> None:
        self._script = self.redis.register_script(SCRIPT)

    def limits(self, key: KeyRecord) -> tuple[int, int]:
        rpm = self.requests_per_minute if key.requests_per_minute is None else key.requests_per_minute
        tpm = self.tokens_per_minute if key.tokens_per_minute is None else key.tokens_per_minute
        return rpm, tpm

    async def _run(self, key: KeyRecord, requests: int, tokens: int, admit: bool) -> list[Any]:
        rpm, tpm = self.limits(key)
        if rpm <= 0 and tpm <= 0:
            return [1, 0, ""]
        keys = [f"{PREFIX}:quota:{key.id}:requests", f"{PREFIX}:quota:{key.id}:tokens"]
        return list(await self._script(keys=keys, args=[rpm, tpm, requests, tokens, "1" if admit else "0"]))

    async def admit(self, key: KeyRecord) -> None:
        """Count one request in, or refuse it with RESOURCE_EXHAUSTED and the seconds to wait."""
        admitted, retry_ms, short = await self._run(key, 1, 0, admit=True)
        if not int(admitted):
            rpm, tpm = self.limits(key)
            what = f"{rpm} requests per minute" if short == "requests" else f"{tpm} tokens per minute"
            raise ResourceExhausted(
                f"API key {key.id} is over its quota of {what}", retry_after=max(1, math.ceil(int(retry_ms) / 1000))
            )

    async def charge(self, key: KeyRecord, tokens: int) -> None:
        """Spend the tokens a finished call used (the bucket may go into debt)."""
        if tokens > 0:
            await self._run(key, 0, tokens, admit=False)
