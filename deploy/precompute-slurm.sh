#!/usr/bin/env bash
# Score rollouts into a store on object storage as a Slurm job array: one task per GPU, each task
# one worker of the same run. `lopd precompute` reads its worker index and the number of workers
# from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (server/cluster.py), so every task runs the same
# command; the last task to finish publishes the version (the others exit "waiting for workers").
# A task that dies (preempted, OOM, kill -9) is simply resubmitted: it scores only its missing parts.
#
#   sbatch deploy/precompute-slurm.sh                   (8 tasks: --array=0-7)
#   sbatch --array=3 deploy/precompute-slurm.sh         (rerun task 3 alone; keep SLURM_ARRAY_TASK_COUNT right:
#                                                        LOPD_NUM_WORKERS=8 sbatch --array=3 ...)
#
#SBATCH --job-name=lopd-precompute
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --output=lopd-precompute-%A_%a.log
set -euo pipefail

# Any S3-compatible service: the standard AWS variables (endpoint only when it is not AWS itself).
export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://seaweedfs.internal:8333}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY come from the submitting environment (or an instance profile).

STORE="${LOPD_STORE:-s3://opd-stores/math}"
ROLLOUTS="${ROLLOUTS:-/shared/rollouts/math-v1}"   # every task reads the same rollouts
TEACHER="${TEACHER:-/shared/models/qwen3-32b}"

exec lopd precompute "$ROLLOUTS" \
    --teacher "$TEACHER" --sft-teacher "$TEACHER" \
    --store "$STORE" --dataset math-v1 \
    --device cuda --dtype bfloat16 --no-progress
