"""Host -> device copy bandwidth: the bound under the GPU merge's reads (issue 14, ops/merge/staging.py).

    python3 scripts/bench_transfer.py [--sizes_mb 24,128] [--total_mb 2048] [--threads 1,4] [--out rows.jsonl]

Rows (JSON lines, GB/s = bytes / best of `--repeats` timed passes after one untimed pass):
  read:       a file in the page cache read with os.preadv into fresh memory (a new buffer per tensor, as a merge
              read before staging) and into one reused buffer;
  put:        jax.device_put + block_until_ready from one reused buffer per thread, pageable memory against a staging
              arena (page-locked with the CUDA driver where it can be: `pinned`), from each thread count of
              --threads at once;
  read_put:   read then put, per thread count: fresh pageable memory (the merge before staging) against each thread's
              own staging arena (the merge now);
  first_copy: in a fresh process, the time of the first device_put and of the client start, with jax's GPU
              memory preallocation on (jax's default) and off (what cfm-merge sets).
On the CPU the put rows measure jax adopting or copying host memory, and nothing is page-locked (`pinned` false).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MB = 1 << 20
FIRST_COPY = """
import json, time
t0 = time.perf_counter()
import jax, numpy as np
dev = jax.devices()[0]
t1 = time.perf_counter()
x = np.ones(12 << 20, np.uint16)
times = []
for _ in range(3):
    t = time.perf_counter()
    jax.block_until_ready(jax.device_put(x, dev))
    times.append(time.perf_counter() - t)
print(json.dumps({"client_start_s": t1 - t0, "first_put_ms": 1e3 * times[0], "third_put_ms": 1e3 * times[2]}))
"""


def best_rate(fn, nbytes: int, repeats: int) -> float:
    fn()
    return nbytes / min(_timed(fn) for _ in range(repeats)) / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes_mb", default="24,128", help="tensor sizes (MiB), comma-separated")
    p.add_argument("--total_mb", type=int, default=2048, help="bytes moved per pass (MiB), per size")
    p.add_argument("--threads", default="1,4", help="thread counts of the put and read_put rows")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no_first_copy", action="store_true", help="skip the fresh-process first_copy rows")
    p.add_argument("--out", default="", help="also write the rows here (JSON lines)")
    args = p.parse_args(argv)

    import jax

    from configurable_fm.ops.merge import staging
    from configurable_fm.ops.merge.host_io import aligned_empty

    dev = jax.devices()[0]
    threads = [int(t) for t in args.threads.split(",")]
    rows = []

    def emit(**row):
        row.update(device=dev.device_kind, platform=dev.platform)
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp, staging.StagingPool(dev) as pool:
        for size in (int(s) * MB for s in args.sizes_mb.split(",")):
            n = max(args.total_mb * MB // size, max(threads))
            path = Path(tmp) / "data.bin"
            with open(path, "wb") as f:
                block = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
                for _ in range(n):
                    f.write(block.data)
            fd = os.open(path, os.O_RDONLY)
            total, mb = n * size, size // MB
            reused = aligned_empty((size,), np.uint8)
            reused[:] = 1

            def read(buf, i):
                view, done = memoryview(buf), 0
                while done < size:
                    done += os.preadv(fd, [view[done:]], i * size + done)

            emit(kind="read", memory="fresh", size_mb=mb,
                 gb_s=best_rate(lambda: [read(aligned_empty((size,), np.uint8), i) for i in range(n)], total,
                                args.repeats))
            emit(kind="read", memory="reused", size_mb=mb,
                 gb_s=best_rate(lambda: [read(reused, i) for i in range(n)], total, args.repeats))
            pageable = [aligned_empty((size,), np.uint8) for _ in range(max(threads))]
            for buf in pageable:
                buf[:] = 1
            for t in threads:
                for memory in ("pageable", "staging arena"):
                    def work(w, memory=memory, t=t):
                        if memory == "pageable":
                            for _ in range(w, n, t):
                                jax.block_until_ready(jax.device_put(pageable[w], dev))
                            return
                        with pool.arena():  # the untimed first pass sizes each thread's arena
                            buf = staging.host_empty((size,), np.uint8)
                            for _ in range(w, n, t):
                                jax.block_until_ready(jax.device_put(buf, dev))

                    with cf.ThreadPoolExecutor(t) as ex:
                        rate = best_rate(lambda: list(ex.map(work, range(t))), total, args.repeats)
                    emit(kind="put", memory=memory, threads=t, size_mb=mb, gb_s=rate,
                         pinned=memory == "staging arena" and pool.pinned)
                for memory in ("fresh pageable", "staging arena"):
                    def work(w, memory=memory, t=t):
                        for i in range(w, n, t):
                            if memory == "fresh pageable":
                                buf = aligned_empty((size,), np.uint8)
                                read(buf, i)
                                jax.block_until_ready(jax.device_put(buf, dev))
                                continue
                            with pool.arena():
                                buf = staging.host_empty((size,), np.uint8)
                                read(buf, i)
                                jax.block_until_ready(jax.device_put(buf, dev))

                    with cf.ThreadPoolExecutor(t) as ex:
                        rate = best_rate(lambda: list(ex.map(work, range(t))), total, args.repeats)
                    emit(kind="read_put", memory=memory, threads=t, size_mb=mb, gb_s=rate)
            os.close(fd)
        emit(kind="staging", pinned=pool.pinned)

    if not args.no_first_copy:
        for prealloc in ("default", "false"):
            env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
            if prealloc != "default":
                env["XLA_PYTHON_CLIENT_PREALLOCATE"] = prealloc
            out = subprocess.run([sys.executable, "-c", FIRST_COPY], env=env, capture_output=True, text=True,
                                 timeout=300)
            if out.returncode != 0:
                emit(kind="first_copy", preallocate=prealloc, error=out.stderr.strip().splitlines()[-1:])
                continue
            emit(kind="first_copy", preallocate=prealloc, **json.loads(out.stdout.strip().splitlines()[-1]))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
