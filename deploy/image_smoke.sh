#!/usr/bin/env bash
# Build the CPU image with podman, start it, wait for its HEALTHCHECK command to pass and for /ready.
#   bash deploy/image_smoke.sh            (as root, from the repository root; tests/api/test_image.py runs it)
#
# Where this can run as is: a machine where `podman run` works and docker.io is reachable. This script
# also runs in the loraplex sandbox (no registry, no OCI runtime allowed), with three stand-ins, each
# switched on by an environment variable:
#   SMOKE_LOCAL_BASE=1   build python:3.11-slim-bookworm locally with debootstrap (Debian bookworm,
#                        Debian's Python 3.11, pip allowed system-wide) when no registry can serve it;
#                        the host's CA bundle and pip find-links go into it (the sandbox's TLS proxy).
#   SMOKE_WHEELS=DIR     mount DIR (read-only) into the build as a pip find-links source (the CPU torch
#                        wheel on local disk); the image's TORCH_INDEX_URL then defaults to PyPI.
#   SMOKE_CHROOT=1       start the image's CMD by chroot into a created container's root, as user
#                        10001 with the image's environment, instead of `podman run` (crun may not set
#                        rlimits or cgroups there).
set -euo pipefail
IMAGE=${IMAGE:-localhost/loraplex:cpu-smoke}
PORT=8000  # the image's CMD port
TIMEOUT_S=${TIMEOUT_S:-600}
log() { echo "[image-smoke] $*" >&2; }

if [ -n "${SMOKE_LOCAL_BASE:-}" ] && ! podman image exists docker.io/library/python:3.11-slim-bookworm; then
  root=$(mktemp -d)
  log "debootstrap bookworm into $root (stand-in for python:3.11-slim-bookworm)"
  debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian > "$root.log" 2>&1
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\nfind-links = /opt/wheels\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
  tar -C "$root" -c . | podman import --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' --change 'CMD ["python3"]' \
    - docker.io/library/python:3.11-slim-bookworm > /dev/null
  rm -rf "$root" "$root.log"
fi

build=(podman build --format docker --pull=never -t "$IMAGE")  # docker format: OCI drops HEALTHCHECK
if [ -n "${SMOKE_WHEELS:-}" ]; then
  build+=(-v "$SMOKE_WHEELS:/opt/wheels:ro" --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
fi
[ -n "${SMOKE_CHROOT:-}" ] && build+=(--isolation chroot)
log "building $IMAGE"
start=$(date +%s)
"${build[@]}" . > "${BUILD_LOG:-/tmp/image-smoke-build.log}" 2>&1 || { tail -20 "${BUILD_LOG:-/tmp/image-smoke-build.log}"; exit 1; }
log "built in $(( $(date +%s) - start )) s"

# The keys file the image's LORAPLEX_AUTH_FILE names (it refuses 0.0.0.0 without one), made with the
# image's own `keys add`.
# Exec-form arrays as shell words, quoted (the HEALTHCHECK's python -c program holds spaces).
shell_words() { python3 -c 'import json, shlex, sys; argv = json.load(sys.stdin); print(shlex.join(argv[argv[:1] == ["CMD"]:]))'; }
healthcheck=$(podman image inspect "$IMAGE" --format '{{json .Config.Healthcheck.Test}}' | shell_words)
log "HEALTHCHECK: $healthcheck"
keys_dir=$(mktemp -d)
cleanup() {
  if [ -n "${server_pid:-}" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -n "${rootfs:-}" ]; then umount "$rootfs/proc" "$rootfs/dev" 2>/dev/null || true; podman unmount "$container" > /dev/null; fi
  [ -n "${container:-}" ] && podman rm -f "$container" > /dev/null 2>&1
  rm -rf "$keys_dir"
}
trap cleanup EXIT

if [ -n "${SMOKE_CHROOT:-}" ]; then
  container=$(podman create "$IMAGE")
  rootfs=$(podman mount "$container")
  mount --bind /proc "$rootfs/proc"
  mount --bind /dev "$rootfs/dev"
  mapfile -t env < <(podman image inspect "$IMAGE" --format '{{range .Config.Env}}{{println .}}{{end}}' | grep .)
  chroot "$rootfs" env -i "${env[@]}" sh -c 'cd /app && python -m server keys add --tenant smoke \
      --scopes generate,admin --adapters "*" --file "$LORAPLEX_AUTH_FILE" > /dev/null && chown 10001 "$LORAPLEX_AUTH_FILE"'
  cmd=$(podman image inspect "$IMAGE" --format '{{json .Config.Cmd}}' | shell_words)
  log "starting the CMD by chroot as 10001: $cmd"
  chroot --userspec=10001:10001 "$rootfs" env -i "${env[@]}" HOME=/home/loraplex sh -c "cd /app && exec $cmd" \
    > "${SERVER_LOG:-/tmp/image-smoke-server.log}" 2>&1 &
  server_pid=$!
  probe() { chroot --userspec=10001:10001 "$rootfs" env -i "${env[@]}" sh -c "$healthcheck" > /dev/null 2>&1; }
else  # not run in the sandbox (crun is refused there): podman's own run and healthcheck
  podman run --rm -v "$keys_dir:/keys" "$IMAGE" python -m server keys add --tenant smoke --scopes generate,admin \
    --adapters "*" --file /keys/keys.toml > /dev/null
  container=$(podman create -p "$PORT:$PORT" -v "$keys_dir/keys.toml:/etc/loraplex/keys.toml:ro" "$IMAGE")
  podman start "$container" > /dev/null
  probe() { podman healthcheck run "$container" > /dev/null 2>&1; }
fi

deadline=$(( $(date +%s) + TIMEOUT_S ))
until probe; do
  if [ "$(date +%s)" -ge "$deadline" ]; then log "no healthy answer in $TIMEOUT_S s"; exit 1; fi
  if [ -n "${server_pid:-}" ] && ! kill -0 "$server_pid" 2>/dev/null; then
    log "the server exited"; tail -20 "${SERVER_LOG:-/tmp/image-smoke-server.log}"; exit 1
  fi
  sleep 2
done
log "HEALTHCHECK passes $(( $(date +%s) - start )) s after the build started (it passes while loading)"
until curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null; do
  if [ "$(date +%s)" -ge "$deadline" ]; then log "not ready in $TIMEOUT_S s"; exit 1; fi
  sleep 2
done
log "ready $(( $(date +%s) - start )) s after the build started"
curl -s "http://127.0.0.1:$PORT/health"
echo
