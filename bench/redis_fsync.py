"""What `appendfsync always` costs a job submission, against `everysec`, measured in the same run.

The local stack's Redis flushes its append-only file on every write (libs/common/local_redis.py)
so that a job the training service acknowledged survives a power cut. This times the Redis part
of a submission (JobStore.create: one Lua script that writes the token, the job hash, the index
and the first event) N times on two servers that differ only in `appendfsync`, both configured
as the stack configures its own, in one folder on the same disk.

Run: python -m bench redis_fsync [--quick]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from libs.common import local_redis
from libs.common.ports import free_port
from services.training.jobstore import JobStore

SUBMISSIONS = 1000
ROUNDS = 3
PASSWORD = "bench"


def start(binary: str, folder: Path, fsync: str) -> tuple[subprocess.Popen[str], str]:
    folder.mkdir()
    port = free_port()
    text = local_redis.config_text(
        port=port,
        directory=folder,
        password=PASSWORD,
        major_version=local_redis.redis_major_version(binary),
        fsync=fsync,
    )
    conf = local_redis.write_config(folder, text)
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            return proc, f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    raise RuntimeError(f"redis-server exited with {proc.wait()}")


def submissions_per_second(store: JobStore, n: int, round_no: int) -> float:
    config = {"max_steps": 100, "model_name": "bench", "corpus": ["docs"]}
    begin = time.perf_counter()
    for i in range(n):
        store.create("pretrain", config, "local_ray", client_token=f"r{round_no}-{i}")
    return n / (time.perf_counter() - begin)


def main() -> None:
    n = SUBMISSIONS // 10 if "--quick" in sys.argv else SUBMISSIONS
    binary = local_redis.redis_server_binary()
    with tempfile.TemporaryDirectory(prefix="llmp-bench-fsync-", dir=Path.home()) as tmp:
        servers = {fsync: start(binary, Path(tmp) / fsync, fsync) for fsync in ("everysec", "always")}
        try:
            stores = {fsync: JobStore.from_url(url) for fsync, (_, url) in servers.items()}
            rates: dict[str, list[float]] = {fsync: [] for fsync in stores}
            for round_no in range(ROUNDS):  # interleaved, so a busy moment of the machine hits both
                for fsync, store in stores.items():
                    rates[fsync].append(submissions_per_second(store, n, round_no))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    print(f"\n== redis: job submissions (JobStore.create), {n} x {ROUNDS} rounds, {binary} ==")
    print(f"{'appendfsync':>12} {'submissions/s':>14} {'ms each':>8}   (rounds)")
    for fsync, values in rates.items():
        median = statistics.median(values)
        print(f"{fsync:>12} {median:14.0f} {1000 / median:8.3f}   ({', '.join(f'{v:.0f}' for v in values)})")
    ratio = statistics.median(rates["everysec"]) / statistics.median(rates["always"])
    print(f"ratio time always/everysec = {ratio:.2f}x   (what durability costs one submission's Redis write)")


if __name__ == "__main__":
    main()
