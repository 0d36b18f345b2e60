"""Which devices each of a sweep's worker slots gives its trials, decided without starting
JAX in the sweep process (a TPU belongs to one process at a time): a share of the GPUs each,
one TPU chip each (or all of them for one worker), or the host's CPU devices for all."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

from jaxlm.errors import SweepError


def worker_envs(workers: int, environ=os.environ) -> tuple[list[dict], int]:
    """Each worker's environment additions and the devices one trial sees: a share of the
    GPUs, one TPU chip each (or the whole host for one worker), the CPU devices for all."""
    if workers < 1:
        raise SweepError(f"--workers={workers}: give 1 or more")
    wants_cpu = environ.get("JAX_PLATFORMS", "") == "cpu"
    gpus = [] if wants_cpu else _gpu_ids(environ)
    chips = [] if wants_cpu or gpus else _tpu_chips()
    if gpus:
        if workers > len(gpus):
            raise SweepError(f"--workers={workers}: this host has {len(gpus)} GPU(s); at most that")
        per = len(gpus) // workers
        return [
            {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per : (i + 1) * per])}
            for i in range(workers)
        ], per
    if chips:
        if workers == 1:
            return [{}], len(chips)
        if workers != len(chips):
            raise SweepError(
                f"--workers={workers}: this TPU VM has {len(chips)} chips; run 1 worker (all "
                f"chips) or {len(chips)} (one chip each)"
            )
        return [
            {
                "TPU_VISIBLE_CHIPS": str(i),
                "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1",
                "TPU_PROCESS_BOUNDS": "1,1,1",
                "TPU_PROCESS_PORT": str(8476 + i),
            }
            for i in range(workers)
        ], 1
    forced = re.search(r"xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    return [{} for _ in range(workers)], int(forced.group(1)) if forced else 1


def _gpu_ids(environ) -> list[str]:
    if environ.get("CUDA_VISIBLE_DEVICES"):
        return [g for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]


def _tpu_chips() -> list[str]:
    return sorted(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
