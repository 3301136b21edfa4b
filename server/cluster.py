"""Which worker of a cluster job this process is: the defaults of `--num-workers` and `--worker-index`.

Cluster schedulers start one process per task and tell it its index in the environment; reading it
here lets the same `lopd precompute` command line run as every task of the job:

- Slurm job array (`sbatch --array=0-7`): index `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`,
  count `SLURM_ARRAY_TASK_COUNT`;
- Kubernetes Indexed Job (`completionMode: Indexed`): index `JOB_COMPLETION_INDEX`, count
  `LOPD_NUM_WORKERS` (set to the Job's `completions`).

A Kubernetes pod cannot read its Job's `completions` from the environment, so the manifest sets
`LOPD_NUM_WORKERS` (deploy/precompute-indexed-job.yaml). Flags and `LOPD_NUM_WORKERS` /
`LOPD_WORKER_INDEX` override these defaults.
"""

from __future__ import annotations

import os


def _int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def default_num_workers() -> int:
    """`SLURM_ARRAY_TASK_COUNT` in a Slurm array task, else 1 (an Indexed Job sets `LOPD_NUM_WORKERS`)."""
    count = _int("SLURM_ARRAY_TASK_COUNT")
    return count if count is not None and count >= 1 else 1


def default_worker_index() -> int:
    """This task's index from 0: the Slurm array index (less the array's first), or the Indexed Job's, else 0."""
    task = _int("SLURM_ARRAY_TASK_ID")
    if task is not None:
        return task - (_int("SLURM_ARRAY_TASK_MIN") or 0)
    index = _int("JOB_COMPLETION_INDEX")
    return index if index is not None else 0
