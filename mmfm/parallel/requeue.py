"""Requeue a SLURM job after a signal-triggered checkpoint: the one piece of SLURM the
training runtime needs (`mmfm slurm`, which writes and submits the job scripts, sits above
training and is never imported by it).
"""

from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger("mmfm")


def restart_count() -> int | None:
    """How often SLURM restarted this job (None outside SLURM)."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def requeue_after_stop(max_requeues: int) -> bool:
    """After a signal-triggered checkpoint under SLURM: requeue this job (it resumes from the
    checkpoint). Only this path requeues: a job that fails with an error does not."""
    count = restart_count()
    if count is None:
        return False
    if count >= max_requeues:
        log.warning("not requeueing: the job restarted %d times (train.max_requeues)", count)
        return False
    job = os.environ["SLURM_JOB_ID"]
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return False
    log.info("requeued SLURM job %s (restart %d); it resumes from the checkpoint", job, count + 1)
    return True
