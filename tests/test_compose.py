"""docker-compose.yml: valid, safe by construction, and every service command is a real `lopd` command.

The file is checked as data, and each service's command runs outside containers with the container
paths mapped onto temporary ones: the store is served, a dataset is precomputed into it, and the
trainer trains against it. tests/deploy/test_compose_real.py runs the file itself, with podman.
"""

from __future__ import annotations

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


def _defaults(arg: str) -> str:
    """Resolve `${VAR:-default}` the way compose does when VAR is unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(arg))


def _command(service: str, mapping: dict[str, str]) -> list[str]:
    out = []
    for arg in SERVICES[service]["command"]:
        arg = _defaults(arg)
        for container, host in mapping.items():
            if arg == container or arg.startswith(container + "/") or arg.startswith(container + ":"):
                arg = host + arg[len(container) :]
        out.append(arg)
    return [sys.executable, "-m", "lopd", *out]


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
        health = health.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("python", sys.executable, 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            check = subprocess.run(["sh", "-c", health], capture_output=True)
            if check.returncode == 0:
                break
            time.sleep(0.2)
        assert check.returncode == 0, "the healthcheck command never passed"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/datasets").json()["datasets"][0]["name"] == "rollouts"
        train_cmd = _command("trainer", mapping)
        train_cmd[train_cmd.index("--steps") + 1] = "2"
        trained = subprocess.run(train_cmd, capture_output=True, text=True, timeout=300)
        assert trained.returncode == 0, trained.stderr
        assert (tmp_path / "runs" / "student" / "metrics.csv").is_file()
    finally:
        server.kill()
        server.wait()
