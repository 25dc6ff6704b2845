"""The GPU benchmark: on a CUDA machine, same-run ratios of the peer configuration's precompute (bf16 and fp32,
beside SAEDashboard if installed), attribution graphs for 32- and 128-token prompts, and 8 concurrent steering
requests. On a machine without CUDA it says so and exits 0.

Usage: python bench/gpu.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - t, out.stdout


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device is present: bench/gpu.py measures the GPU configuration and has nothing to run here")
        return 0
    print(f"CUDA device: {torch.cuda.get_device_name(0)}")
    import os

    py = sys.executable
    peer = Path(os.environ.get("PEER", "/tmp/peer"))
    results = {}
    for dtype in ("bfloat16", "float32"):
        if peer.is_dir():  # the peer configuration beside SAEDashboard (bench/peer.py prints both and their ratios)
            s, out = run([py, "bench/peer.py", "--also", f"--dtype {dtype} --device cuda"])
        else:  # no SAEDashboard setup: saescope alone on the embedded default
            s, out = run([py, "-m", "saescope.app.cli", "precompute", "--dtype", dtype, "--device", "cuda",
                          "--out", f"/tmp/gpu_{dtype}.duckdb", "--restart"])
        results[f"precompute_{dtype}_s"] = s
        results[f"precompute_{dtype}_out"] = out.strip()[-2000:]
    s, out = run([py, "bench/circuits.py", "--tokens", "32", "128"])
    results["graphs"] = out.strip()
    s, out = run([py, "bench/steer_worker.py", "--requests", "8"])
    results["steer_8_concurrent"] = out.strip()
    for k, v in results.items():
        print(f"{k}: {v}")
    if results["precompute_float32_s"]:
        print(f"bf16/fp32 precompute time ratio: {results['precompute_bfloat16_s'] / results['precompute_float32_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
