"""Measured time of a `wkvq quantize` run against its estimate (`--dry-run --estimate-for cpu`): wall seconds and
CPU seconds (user + sys of the run's process). On a shared machine the wall time grows with the other load while
the CPU seconds do not; on an idle machine a run of these small matmuls takes about its CPU seconds (RESULTS.md).

    python benchmarks/cpu_time.py -- --model wkvq_core/assets/stories260k --calib ... [any `wkvq quantize` options]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def measure(args: list[str]) -> dict[str, float]:
    """{"estimate", "wall", "cpu"} seconds of `wkvq quantize ARGS` (without --out)."""
    wkvq = [sys.executable, "-m", "wkvq_core.cli", "quantize", *args]
    dry = subprocess.run([*wkvq, "--out", "unused", "--dry-run", "--json", "--estimate-for", "cpu"],
                         capture_output=True, text=True, check=True)
    estimate = json.loads(dry.stdout)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        process = subprocess.Popen([*wkvq, "--out", os.path.join(out, "artifact"), "--json"], stdout=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"wkvq quantize failed: {status}")
        process.stdout.close()
    return {"estimate": estimate["seconds"], "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "estimate_by_phase": estimate["breakdown"]["seconds"]}


if __name__ == "__main__":
    argv = sys.argv[1:]
    result = measure(argv[argv.index("--") + 1:] if "--" in argv else argv)
    print(json.dumps(result, indent=1))
    print(f"estimate {result['estimate']:.1f} s; measured wall {result['wall']:.1f} s, cpu {result['cpu']:.1f} s; "
          f"cpu / estimate {result['cpu'] / result['estimate']:.2f}")
