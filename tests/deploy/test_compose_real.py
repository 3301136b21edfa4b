"""docker-compose.yml run for real (issue 17): both images built, the services up, healthy, used and taken down.

These machines have no Docker engine; Debian's podman, podman-compose (1.0.3) and runc run the same file.
`scripts/compose_ci.sh` (run by `scripts/setup.sh` as root) installs them, writes the containers.conf these
machines need (runc, cgroupfs, ulimits) and the pip.conf CI's builds need (the proxy's CA, the local CPU torch
wheel), and makes the base image from Debian's packages. This test reads what it made (`--print-env`) and
fails, saying how to fix it, where any of that is missing: it never skips.

podman-compose 1.0.3 falls short of Docker Compose in three ways, and the test stands in for each:
- its exit codes say nothing (`build` and `run` exit 0 whatever happened): every step is checked through
  podman itself (the images exist, the container's exit code, its health);
- it knows no profiles and no `depends_on` conditions: services are named one by one, in order;
- podman schedules healthchecks with systemd timers, and these machines run no systemd ("unable to get
  systemd connection to add healthchecks"): the test is the scheduler, running the compose file's
  healthcheck with `podman healthcheck run` every half second, as Docker would every `interval`. podman
  4.3 also ignores failed checks during `start_period` even after a healthy one (Docker counts those), so
  the run sets the file's `LOPD_HEALTH_START_PERIOD` to seconds rather than its default of minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from lopd.client.http import StoreClient
from lopd.storage import layout
from lopd.storage.reader import Store
from tests.server.test_precompute import write_rollouts
from tests.utils.s3 import aws_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
S3_COMPOSE_FILE = ROOT / "docker-compose.s3.yml"  # the same images, over SeaweedFS
S3_STORE_URL = "s3://lopd/store"  # the file's STORE_URL default (its bucket is the one SeaweedFS creates)
STORE_IMAGE = "lightning-opd-store:latest"
FULL_IMAGE = "lightning-opd:latest"
COMPOSE_BUILDS = [name for name, svc in yaml.safe_load(COMPOSE_FILE.read_text())["services"].items() if "build" in svc]
UID = 10001  # the images' user (Dockerfile) and the services' `user:`
START_PERIOD_S = 15
# The store image is the server alone: no torch, and a size budget that notices if one sneaks in.
STORE_IMAGE_MAX_BYTES = 700 * 10**6


def _ci_env() -> dict[str, str]:
    """What scripts/compose_ci.sh set up (its `--print-env`), or a failure that says how to set it up."""
    script = ROOT / "scripts" / "compose_ci.sh"
    got = subprocess.run(["bash", str(script), "--print-env"], capture_output=True, text=True, timeout=60)
    if got.returncode != 0:
        pytest.fail(
            "the container tools for the compose test are missing (.ci/run installs them with "
            f"`bash scripts/compose_ci.sh`): {got.stderr.strip()}",
            pytrace=False,
        )
    return dict(line.split("=", 1) for line in got.stdout.splitlines() if "=" in line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readable_copy(src: Path, dst: Path) -> Path:
    """A copy the services' user can read (pytest's temporary folders are private to root)."""
    shutil.copytree(src, dst)
    for path in [dst, *dst.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


class Stack:
    """podman-compose over docker-compose.yml under a private project name, and the podman checks beside it."""

    def __init__(self, ci: dict[str, str], workdir: Path, compose_file: Path, project: str) -> None:
        self.ci = ci
        self.compose_file = compose_file
        self.project = project
        self.port, self.replica_ports, self.s3_port = _free_port(), [_free_port(), _free_port()], _free_port()
        self.dirs = {name: workdir / name for name in ("store", "rollouts", "teacher", "student", "runs")}
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": ci["CONTAINERS_CONF"],
            "STORE_DIR": str(self.dirs["store"]),
            "ROLLOUTS_DIR": str(self.dirs["rollouts"]),
            "TEACHER_DIR": str(self.dirs["teacher"]),
            "STUDENT_DIR": str(self.dirs["student"]),
            "RUNS_DIR": str(self.dirs["runs"]),
            "LOPD_PORT": str(self.port),
            "DATASET": "rollouts",
            "TRAIN_STEPS": "2",
            "LOPD_HEALTH_START_PERIOD": f"{START_PERIOD_S}s",
            # docker-compose.s3.yml's: the replicas' and SeaweedFS's host ports, and CI's SeaweedFS image
            "LOPD_PORT_1": str(self.replica_ports[0]),
            "LOPD_PORT_2": str(self.replica_ports[1]),
            "S3_PORT": str(self.s3_port),
            "SEAWEEDFS_IMAGE": ci["LOPD_CI_SEAWEEDFS_IMAGE"],
        }
        for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "STORE_URL"):
            self.env.pop(key, None)  # the files' defaults, not whatever the test session exported

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        cmd = ["podman-compose", "-p", self.project, "-f", str(self.compose_file)]
        cmd += ["--podman-build-args", self.ci["LOPD_CI_PODMAN_BUILD_ARGS"], *args]
        return subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        got = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and got.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({got.returncode}): {got.stderr[-3000:]}")
        return got

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def health(self, name: str) -> str:
        return self.podman("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()

    def wait_health(self, name: str, want: str, timeout: float) -> float:
        """Run the container's healthcheck every 0.5 s until its status is `want`; seconds it took."""
        start = time.monotonic()
        while True:
            self.podman("healthcheck", "run", name, check=False)
            status = self.health(name)
            if status == want:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                logs = self.podman("logs", name, check=False)
                raise AssertionError(
                    f"{name} still {status!r}, not {want!r}, after {timeout:.0f} s; logs:\n"
                    f"{(logs.stdout + logs.stderr)[-3000:]}"
                )
            time.sleep(0.5)

    def one_off(self, service: str, *command: str, timeout: float = 600) -> tuple[int, str]:
        """`podman-compose run SERVICE [COMMAND]` in the foreground; the container's exit code and its log.

        `--no-deps`: podman-compose 1.0.3 cannot wait for a healthy store (the test has), and with no
        dependencies to start it would start every service in the file.
        """
        name = f"{self.project}_{service}_run"
        self.compose("run", "--no-deps", "-T", "--name", name, service, *command, timeout=timeout)
        try:
            code = self.podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
            logs = self.podman("logs", name, check=False)
            return int(code), (logs.stdout + logs.stderr)[-4000:]
        finally:
            self.podman("rm", "-f", name, check=False)

    def leftovers(self) -> list[str]:
        got = self.podman(
            "ps", "-a", "--format", "{{.Names}}", "--filter", f"label=io.podman.compose.project={self.project}"
        )
        return got.stdout.split()

    def volumes(self) -> list[str]:
        label = f"label=io.podman.compose.project={self.project}"
        return self.podman("volume", "ls", "--format", "{{.Name}}", "--filter", label).stdout.split()

    def remove_all(self) -> None:
        """Whatever a failed run left behind: containers, the project's network and its volumes."""
        for name in self.leftovers():
            self.podman("rm", "-f", "-t", "0", name, check=False)
        self.podman("network", "rm", "-f", f"{self.project}_default", check=False)
        for volume in self.volumes():
            self.podman("volume", "rm", "-f", volume, check=False)


def _stack(tmp_path_factory, tiny_llama_dir, tiny_llama_b_dir, compose_file: Path, project: str) -> Stack:
    s = Stack(_ci_env(), tmp_path_factory.mktemp("compose"), compose_file, project)
    _readable_copy(tiny_llama_dir, s.dirs["teacher"])
    _readable_copy(tiny_llama_b_dir, s.dirs["student"])
    s.dirs["rollouts"].mkdir()
    write_rollouts(s.dirs["rollouts"] / "r.jsonl", 24, seed=17)
    s.dirs["rollouts"].chmod(0o755)
    (s.dirs["rollouts"] / "r.jsonl").chmod(0o644)
    for name in ("store", "runs"):
        s.dirs[name].mkdir()
        os.chown(s.dirs[name], UID, UID)
    return s


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_llama_dir, tiny_llama_b_dir):
    s = _stack(tmp_path_factory, tiny_llama_dir, tiny_llama_b_dir, COMPOSE_FILE, f"lopdci{os.getpid()}")
    yield s
    s.remove_all()


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory, tiny_llama_dir, tiny_llama_b_dir):
    s = _stack(tmp_path_factory, tiny_llama_dir, tiny_llama_b_dir, S3_COMPOSE_FILE, f"lopdci{os.getpid()}s3")
    yield s
    s.remove_all()


def _require_images(stack: Stack) -> None:
    for image in (STORE_IMAGE, FULL_IMAGE):
        if stack.podman("image", "exists", image, check=False).returncode != 0:
            pytest.fail(f"{image} was not built (see test_images_build_and_are_fit_to_ship)", pytrace=False)


PRECOMPUTE_ON_CPU = ["--device", "cpu", "--dtype", "float32", "--no-progress"]


def test_images_build_and_are_fit_to_ship(stack):
    """Step 1: `podman-compose build` makes both targets from the Dockerfile, on CI's Debian-built base."""
    built = stack.compose(
        "build",
        "--build-arg", f"BASE_IMAGE={stack.ci['LOPD_CI_BASE_IMAGE']}",
        "--build-arg", f"TORCH_INDEX={stack.ci['LOPD_CI_TORCH_INDEX']}",
        timeout=2400,
    )  # fmt: skip
    # podman-compose exits 0 whatever its builds did (and an image of an earlier run may carry the tag):
    # the exit code it prints after each `podman build` (one per service with a `build:`) is the verdict.
    builds = re.findall(r"^exit code: (\d+)$", built.stdout, flags=re.M)
    why = f"\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}"
    assert builds == ["0"] * len(COMPOSE_BUILDS), f"podman build exit codes {builds}:{why}"
    for image in (STORE_IMAGE, FULL_IMAGE):
        assert stack.podman("image", "exists", image, check=False).returncode == 0, f"{image} was not built:{why}"
    store = json.loads(stack.podman("image", "inspect", STORE_IMAGE).stdout)[0]
    full = json.loads(stack.podman("image", "inspect", FULL_IMAGE).stdout)[0]
    print(f"\nimage sizes: store {store['Size'] / 1e6:.0f} MB, full {full['Size'] / 1e6:.0f} MB")
    assert store["Config"]["User"] == full["Config"]["User"] == "lopd"
    assert "/readyz" in " ".join(store["Healthcheck"]["Test"]), "the store image carries its healthcheck"
    assert store["Size"] < STORE_IMAGE_MAX_BYTES, f"the store image grew to {store['Size'] / 1e6:.0f} MB"
    no_torch = stack.podman("run", "--rm", "--entrypoint", "python", STORE_IMAGE, "-c", "import torch", check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    has_all = stack.podman(
        "run", "--rm", "--entrypoint", "python", FULL_IMAGE, "-c", "import torch, transformers, peft, lopd.server.api",
        timeout=300,
    )  # fmt: skip
    assert has_all.returncode == 0


def test_compose_up_for_real(stack):
    """Steps 2-8: a store made by `lopd precompute`, served, fetched, trained on, corrupted and taken down."""
    _require_images(stack)
    store_dir = stack.dirs["store"]
    try:
        # 2. The store, made by the full image's `lopd precompute` (the compose service, on the CPU here).
        code, log = stack.one_off(
            "precompute",
            "precompute", "/rollouts", "--teacher", "/models/teacher", "--sft-teacher", "/models/teacher",
            "--store", "/store", "--dataset", "rollouts", *PRECOMPUTE_ON_CPU,
        )  # fmt: skip
        assert code == 0 and "published: rollouts v1" in log, log
        (store_dir / ".readers").mkdir(exist_ok=True)
        os.chown(store_dir / ".readers", UID, UID)

        # 3. Up, and healthy.
        started = time.monotonic()
        stack.compose("up", "-d", "store")
        name = stack.container("store")
        assert stack.podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true"
        stack.wait_health(name, "healthy", timeout=120)
        print(f"\nstore start to healthy: {time.monotonic() - started:.1f} s (podman-compose up -d included)")

        # 4. A batch from the host, through the published port, equals the shards.
        with StoreClient(f"http://127.0.0.1:{stack.port}") as client:
            indices = [5, 0, 23, 5, 11]
            got = client.fetch("rollouts", indices)
        expected = Store(store_dir).open("rollouts").take(indices)
        assert got.num_rows == len(indices) and set(got.column_names) <= set(expected.column_names)
        assert got.to_pylist() == expected.select(got.column_names).to_pylist()

        # 5. The trainer, against http://store:8000 (the service name, resolved in the compose network).
        code, log = stack.one_off("trainer")
        assert code == 0, log
        metrics = (stack.dirs["runs"] / "student" / "metrics.csv").read_text().splitlines()
        assert len(metrics) == 1 + 2, metrics  # a header and the two steps

        # 7. The store cannot write to its volume, nor to its own root file system; only its reader lease.
        for path in ("/store/x", "/store/rollouts/v1/x", "/home/lopd/x", "/opt/venv/x"):
            wrote = stack.podman("exec", name, "touch", path, check=False)
            assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr, (path, wrote.stderr)
        assert any((store_dir / ".readers").iterdir()), "the server wrote no reader lease"
        user = stack.podman("exec", name, "id", "-u").stdout.strip()
        assert user == str(UID)

        # 6. A shard that no longer matches its manifest turns the service unhealthy.
        shard = next(store_dir.glob("rollouts/v1/*.parquet"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        stack.wait_health(name, "unhealthy", timeout=START_PERIOD_S + 60)
        ready = httpx.get(f"http://127.0.0.1:{stack.port}/readyz", timeout=10)
        assert ready.status_code == 503 and shard.name in json.dumps(ready.json()), ready.text

        # 8. Down: nothing of the project is left running.
        stack.compose("down")
        assert stack.leftovers() == []
    finally:
        stack.remove_all()


def test_compose_s3_for_real(s3_stack):
    """docker-compose.s3.yml, the same steps: SeaweedFS, precompute into the bucket, two replicas, the trainer."""
    stack = s3_stack
    _require_images(stack)
    try:
        # 1. SeaweedFS up, and healthy by the file's own check.
        stack.compose("up", "-d", "s3")
        s3 = stack.container("s3")
        stack.wait_health(s3, "healthy", timeout=120)

        # 2. The store, scored into the bucket by the precompute service through http://s3:8333.
        code, log = stack.one_off(
            "precompute",
            "precompute", "/rollouts", "--teacher", "/models/teacher", "--sft-teacher", "/models/teacher",
            "--store", S3_STORE_URL, "--dataset", "rollouts", *PRECOMPUTE_ON_CPU,
        )  # fmt: skip
        assert code == 0 and "published: rollouts v1" in log, log

        # 3. Two replicas, healthy: every object of the version verified against its manifest.
        started = time.monotonic()
        stack.compose("up", "-d", "--no-deps", "store-1", "store-2")
        replicas = [stack.container(name) for name in ("store-1", "store-2")]
        for name in replicas:
            stack.wait_health(name, "healthy", timeout=120)
        print(f"\ntwo S3 replicas start to healthy: {time.monotonic() - started:.1f} s")

        # 4. Both replicas answer with the same bytes, equal to the objects read from the host; stats come from
        # DuckDB over S3 inside the read-only container.
        indices = [5, 0, 23, 5, 11]
        bases = [f"http://127.0.0.1:{port}" for port in stack.replica_ports]
        raw = [httpx.post(f"{b}/v1/datasets/rollouts/batch", json={"indices": indices}, timeout=30) for b in bases]
        assert [r.status_code for r in raw] == [200, 200], [r.text for r in raw]
        assert raw[0].content == raw[1].content
        with pytest.MonkeyPatch.context() as env:
            for key, value in aws_env(stack.s3_port).items():
                env.setenv(key, value)
            env.setenv("AWS_ACCESS_KEY_ID", "lopd")  # the file's default keys
            env.setenv("AWS_SECRET_ACCESS_KEY", "change-me")
            store = layout.check_store_path(S3_STORE_URL)
            expected = Store(store).open("rollouts").take(indices)
            with StoreClient(bases[1]) as client:
                got = client.fetch("rollouts", indices)
            assert got.to_pylist() == expected.select(got.column_names).to_pylist()
            for kind in ("coverage", "consistency"):
                stats = [httpx.get(f"{b}/v1/datasets/rollouts/{kind}", timeout=60) for b in bases]
                assert [r.status_code for r in stats] == [200, 200], [r.text for r in stats]
                assert stats[0].json() == stats[1].json()

            # 5. The trainer, against http://store-1:8000.
            code, log = stack.one_off("trainer")
            assert code == 0, log
            metrics = (stack.dirs["runs"] / "student" / "metrics.csv").read_text().splitlines()
            assert len(metrics) == 1 + 2, metrics

            # 7. A replica writes nothing to its root file system (its only state is in memory and the bucket).
            for path in ("/home/lopd/x", "/opt/venv/x"):
                wrote = stack.podman("exec", replicas[0], "touch", path, check=False)
                assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr, (path, wrote.stderr)

            # 6. An object that no longer matches its manifest turns both replicas unhealthy.
            shard = layout.version_dir(store, "rollouts", 1) / layout.part_name(0)
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
        for name in replicas:
            stack.wait_health(name, "unhealthy", timeout=START_PERIOD_S + 60)
        ready = httpx.get(f"{bases[0]}/readyz", timeout=10)
        assert ready.status_code == 503 and layout.part_name(0) in json.dumps(ready.json()), ready.text

        # 8. Down: nothing of the project is left running.
        stack.compose("down", "-v")
        assert stack.leftovers() == []
    finally:
        stack.remove_all()
    assert stack.volumes() == []
