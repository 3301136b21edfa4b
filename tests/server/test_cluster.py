"""Cluster precompute: worker defaults from Slurm arrays and Kubernetes Indexed Jobs, the deploy/ examples,
and N worker processes writing one store on a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.storage.reader import Store
from tests.server.test_precompute import _cfg, _cli, _shard_hashes, write_rollouts

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX",
                "LOPD_NUM_WORKERS", "LOPD_WORKER_INDEX")  # fmt: skip


def _config() -> PrecomputeConfig:
    return PrecomputeConfig(
        rollouts=[Path("r.jsonl")], teacher=Path("t"), sft_teacher="t", store=Path("s"), dataset="ds"
    )  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_worker_defaults_come_from_the_scheduler(clean_env: pytest.MonkeyPatch) -> None:
    cfg = _config()
    assert (cfg.num_workers, cfg.worker_index) == (1, 0)
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    clean_env.setenv("SLURM_ARRAY_TASK_ID", "7")
    clean_env.setenv("SLURM_ARRAY_TASK_MIN", "5")  # --array=5-8: indices count from the first task
    cfg = _config()
    assert (cfg.num_workers, cfg.worker_index) == (4, 2)
    clean_env.setenv("LOPD_WORKER_INDEX", "3")  # explicit settings win
    assert _config().worker_index == 3


def test_an_indexed_job_needs_its_count(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("JOB_COMPLETION_INDEX", "2")
    with pytest.raises(ValueError, match="LOPD_NUM_WORKERS to the Job's completions"):
        _config()
    clean_env.setenv("LOPD_NUM_WORKERS", "3")
    cfg = _config()
    assert (cfg.num_workers, cfg.worker_index) == (3, 2)


def test_the_indexed_job_manifest_is_a_valid_batch_v1_job() -> None:
    """Kubernetes' own schema for batch/v1 Job (kubernetes-validate ships it, offline; strict: no unknown fields),
    then what that schema cannot say: the Indexed-Job wiring this project relies on."""
    import kubernetes_validate

    job = yaml.safe_load((ROOT / "deploy" / "precompute-indexed-job.yaml").read_text())
    kubernetes_validate.validate(job, "1.33", strict=True)
    typo = {**job, "spec": {**job["spec"], "completionMod": "Indexed"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="completionMod"):
        kubernetes_validate.validate(typo, "1.33", strict=True)
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert isinstance(spec["completions"], int) and spec["completions"] >= 1
    assert 1 <= spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")  # Jobs refuse Always
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert int(env["LOPD_NUM_WORKERS"]["value"]) == spec["completions"]
    assert "JOB_COMPLETION_INDEX" not in env  # set by Kubernetes itself
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"]
    args = container["args"]
    assert args[0] == "precompute" and any(a.startswith("--store=s3://") for a in args)
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    # every flag the manifest passes is one `lopd precompute` knows
    help_text = subprocess.run([sys.executable, "-m", "lopd", "precompute", "--help"], capture_output=True,
                               text=True, env={**os.environ, "COLUMNS": "200"}).stdout  # fmt: skip
    for arg in args[2:]:
        assert arg.split("=")[0] in help_text, arg


def test_the_slurm_script_parses_and_runs_one_command_for_every_task() -> None:
    script = ROOT / "deploy" / "precompute-slurm.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=" in text and "lopd precompute" in text and "--store" in text
    assert "--worker-index" not in text  # the index comes from SLURM_ARRAY_TASK_ID


def _run_all(commands: list[tuple[list[str], dict[str, str]]]) -> list[tuple[int, str]]:
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for cmd, env in commands]  # fmt: skip
    return [(p.wait(timeout=600), p.communicate()[1]) for p in procs]


@pytest.mark.slow
def test_worker_processes_of_a_cluster_job_write_one_store_on_s3(tmp_path, tiny_llama_dir, s3_store) -> None:  # type: ignore[no-untyped-def]
    """2 Slurm array tasks at once; 2 Indexed Job pods at once, one killed mid-part and retried: both stores
    equal one process's, byte for byte."""
    rollouts = write_rollouts(tmp_path / "r.jsonl", 24, seed=11)
    reference = tmp_path / "ref"
    run_precompute(_cfg(tmp_path, rollouts, tiny_llama_dir, store=reference))
    base = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    cmd = _cli(tmp_path, rollouts, tiny_llama_dir, s3_store)

    tasks = _run_all([(cmd, {**base, "SLURM_ARRAY_TASK_ID": str(k), "SLURM_ARRAY_TASK_COUNT": "2"}) for k in (0, 1)])
    assert [code for code, _ in tasks] == [0, 0], tasks
    assert Store(s3_store).versions("ds") == [1]
    assert _shard_hashes(s3_store) == _shard_hashes(reference)

    store = s3_store / "k8s"
    cmd = _cli(tmp_path, rollouts, tiny_llama_dir, store)
    pod = {**base, "LOPD_NUM_WORKERS": "2"}
    pods = _run_all([(cmd, {**pod, "JOB_COMPLETION_INDEX": "0", "LOPD_FAULT": "during_part_write:1"}),
                     (cmd, {**pod, "JOB_COMPLETION_INDEX": "1"})])  # fmt: skip
    assert [code for code, _ in pods] == [137, 0], pods
    assert Store(store).catalogue() == {}  # pod 1 finished its parts and waits for pod 0's
    [(code, err)] = _run_all([(cmd, {**pod, "JOB_COMPLETION_INDEX": "0"})])  # Kubernetes retries the index
    assert code == 0, err
    assert _shard_hashes(store) == _shard_hashes(reference)
