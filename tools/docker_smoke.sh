#!/usr/bin/env bash
# Build the image and run it for real: ingest a generated log over TCP, check the stats
# endpoint against figures computed independently from that file, check the container runs as
# non-root and turns healthy, and that the data survives `docker stop` and a new container on
# the same volume. Cleans up everything it started, also on failure or Ctrl-C.
#
# Works on a normal machine (a running engine that can pull python:3.12-slim) and on one
# without registry access (../shared/docker-local.md): there, as root, it installs docker.io
# and debootstrap from Debian if missing, starts a private dockerd with its state in a temp
# dir, and builds a local base image `local/python-base:bookworm` with debootstrap. The
# rootfs tarball is cached in $STATSD_DOCKER_CACHE (default ~/.cache/statsd-docker, about
# 180 MB) so later runs skip the debootstrap (1-3 minutes); delete the directory to rebuild it.
#
# Exit status: 0 passed, 1 failed, 77 skipped (no Docker engine can be reached or started;
# the reason is printed as "Docker check SKIPPED: ..." and, if DOCKER_SMOKE_SKIP_FILE is set,
# written to that file).
#
# Settings (environment): STATSD_BASE_IMAGE (skip the base image search and use this one),
# STATSD_SMOKE_CACERT (CA bundle handed to the build as the `cacert` secret; default
# /etc/ssl/certs/ca-certificates.crt if it exists; empty: no secret), STATSD_DOCKER_CACHE,
# STATSD_SMOKE_TMPFS_SIZE (cap of the private engine's tmpfs, default 4g).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

IMAGE=statsd-server:smoke
SUFFIX=$$-$RANDOM
VOLUME=statsd-smoke-data-$SUFFIX
UPSTREAM_BASE=python:3.12-slim
LOCAL_BASE=local/python-base:bookworm
# python3-venv brings pip (as a wheel for ensurepip); no compiler, no python3-pip.
BASE_PACKAGES=python3,python3-venv,ca-certificates
CACHE_DIR=${STATSD_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/statsd-docker}
BASE_TARBALL=$CACHE_DIR/python-base-bookworm-${BASE_PACKAGES//,/-}.tar
LINES=20000
SKIP_STATUS=77

START=$SECONDS
step() { printf '\n==> [%4ss] %s\n' "$((SECONDS - START))" "$*"; }
info() { printf '    %s\n' "$*"; }
fail() {
    printf '\nDocker smoke test FAILED: %s\n' "$*" >&2
    exit 1
}
skip() {
    printf '\nDocker check SKIPPED: %s\n' "$*"
    if [ -n "${DOCKER_SMOKE_SKIP_FILE:-}" ]; then printf '%s\n' "$*" >"$DOCKER_SMOKE_SKIP_FILE"; fi
    exit "$SKIP_STATUS"
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/statsd-smoke.XXXXXX")
DOCKER=""
DAEMON_PID=""
ENGINE_TMPFS=""
CONTAINERS=()
CURRENT=""
VOLUME_MADE=0

cleanup() {
    local status=$?
    set +e
    trap - INT TERM
    if [ "$status" -ne 0 ] && [ "$status" -ne "$SKIP_STATUS" ] && [ -n "$CURRENT" ] &&
        [ -n "$DOCKER" ]; then
        printf '\n--- last lines of %s ---\n' "$CURRENT" >&2
        "$DOCKER" logs --tail 40 "$CURRENT" >&2 2>&1
        printf -- '--- end of logs ---\n' >&2
    fi
    local cleanup_start=$SECONDS noisy=0
    if [ "${#CONTAINERS[@]}" -gt 0 ] || [ "$VOLUME_MADE" = 1 ] || [ -n "$DAEMON_PID$ENGINE_TMPFS" ]; then
        step "Cleaning up"
        noisy=1
    fi
    for c in "${CONTAINERS[@]}"; do
        "$DOCKER" rm -f "$c" >/dev/null 2>&1 && info "removed container $c"
    done
    if [ "$VOLUME_MADE" = 1 ]; then
        "$DOCKER" volume rm -f "$VOLUME" >/dev/null 2>&1 && info "removed volume $VOLUME"
    fi
    if [ -n "$DAEMON_PID" ]; then
        kill -TERM "$DAEMON_PID" 2>/dev/null
        for _ in $(seq 60); do
            kill -0 "$DAEMON_PID" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$DAEMON_PID" 2>/dev/null; then
            info "dockerd $DAEMON_PID did not stop in 30 s; killing it"
            kill -KILL "$DAEMON_PID" 2>/dev/null
        fi
        wait "$DAEMON_PID" 2>/dev/null
        info "stopped the private dockerd (pid $DAEMON_PID) at $((SECONDS - START)) s"
    fi
    # Anything left mounted under the temp dir (dockerd's netns file, the tmpfs, an interrupted
    # debootstrap's /proc) goes first, and rm stays on this file system whatever happens.
    grep -o " $WORK/[^ ]*" /proc/mounts 2>/dev/null | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null
    done
    rm -rf --one-file-system "$WORK"
    if [ "$noisy" = 1 ]; then
        info "cleaned up in $((SECONDS - cleanup_start)) s; total $((SECONDS - START)) s"
    fi
    if [ "$status" -eq 0 ] && [ -z "$DAEMON_PID" ] && [ -n "$DOCKER" ]; then
        info "left the image $IMAGE in the engine (docker rmi $IMAGE to remove it)"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'echo "terminated" >&2; exit 143' TERM

docker_() { "$DOCKER" "$@"; }

# ---------------------------------------------------------------- helpers in Python (stdlib)
# Expected figures come from the generated file itself, with the README's grammar and
# definitions, never from the server's code.
cat >"$WORK/check.py" <<'PYTHON'
"""Smoke-test checks: free ports, health probe, TCP ingest, stats against independent figures."""

from __future__ import annotations

import collections
import datetime as dt
import json
import math
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal

# README "Line grammar", text lines: six fields separated by spaces or tabs.
LINE = re.compile(
    r"(\d{4}-\d{2}-\d{2})[ \t]+(\d{2}:\d{2}:\d{2}(?:\.\d+)?)[ \t]+(\S{1,128})[ \t]+(/\S*)"
    r"[ \t]+(\d{3})[ \t]+(\d+(?:\.\d+)?)"
)
COUNTS = ("total_requests", "successful_requests", "failed_requests", "client_errors",
          "server_errors")


def read_log(path):
    """(accepted, rejected, {customer: {day: [(status, ms)]}}) as the grammar defines them."""
    days = collections.defaultdict(lambda: collections.defaultdict(list))
    accepted = rejected = 0
    with open(path, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\n").rstrip(b"\r").decode().strip(" \t")
            if not line:
                continue
            m = LINE.fullmatch(line)
            try:
                ok = bool(m) and 100 <= int(m[5]) <= 599
                if ok:
                    dt.date.fromisoformat(m[1])
                    dt.time.fromisoformat(m[2])
            except ValueError:
                ok = False
            if not ok:
                rejected += 1
                continue
            accepted += 1
            days[m[3]][m[1]].append((int(m[5]), Decimal(m[6]) * 1000))
    return accepted, rejected, days


def nearest_rank(sorted_ms, q):
    return sorted_ms[max(1, math.ceil(q * len(sorted_ms))) - 1]


def figures(items):
    n = len(items)
    server = sum(1 for s, _ in items if s >= 500)
    ms = sorted(float(v) for _, v in items)
    return {
        "total_requests": n,
        "successful_requests": sum(1 for s, _ in items if s < 400),
        "failed_requests": sum(1 for s, _ in items if s >= 400),
        "client_errors": sum(1 for s, _ in items if 400 <= s < 500),
        "server_errors": server,
        "uptime_pct": 100 * (n - server) / n,
        "avg_latency_ms": float(sum(v for _, v in items) / n),
        "p50": nearest_rank(ms, 0.5),
        "p99": nearest_rank(ms, 0.99),
    }


def compare(where, got, want, errors):
    for key in COUNTS:
        if got[key] != want[key]:
            errors.append(f"{where}: {key} = {got[key]}, expected {want[key]}")
    for key in ("uptime_pct", "avg_latency_ms"):  # the server rounds to 3 decimals
        if got[key] is None or abs(got[key] - want[key]) > 0.0011:
            errors.append(f"{where}: {key} = {got[key]}, expected {want[key]:.3f}")
    for key, q in (("median_latency_ms", "p50"), ("p99_latency_ms", "p99")):
        # Exact days must match exactly; sketched ones within the error the server states.
        bound = got["quantile_error"][q] * abs(got[key] or 0) + 0.0011
        if got[key] is None or abs(got[key] - want[q]) > bound:
            errors.append(f"{where}: {key} = {got[key]}, expected {want[q]} (+-{bound:.3f})")


def http_get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def cmd_ports():
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def cmd_probe(port, path="/health"):
    try:
        status, body = http_get(int(port), path)
    except OSError:
        return 1
    return 0 if status == 200 else 1


def cmd_probe_outside(port):
    """/health on this machine's own non-loopback address: the server listens beyond 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # a UDP connect sends nothing; it picks the source address
        address = s.getsockname()[0]
    if address.startswith("127."):
        print("    no non-loopback address on this machine; not checked")
        return 0
    with urllib.request.urlopen(f"http://{address}:{port}/health", timeout=10) as r:
        print(f"    http://{address}:{port}/health -> {r.status} (listening on all addresses)")
    return 0


def cmd_ingest(log, port):
    accepted, rejected, _ = read_log(log)
    with socket.create_connection(("127.0.0.1", int(port)), timeout=120) as s, open(log, "rb") as f:
        s.sendfile(f)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    summary = json.loads(reply.decode().strip().splitlines()[-1])
    print(f"    server summary: {json.dumps(summary)}")
    print(f"    expected:       accepted {accepted}, rejected {rejected} (from the file)")
    if (summary["accepted"], summary["rejected"]) != (accepted, rejected):
        print("    MISMATCH between the server's summary and the file", file=sys.stderr)
        return 1
    if sum(summary["rejected_by_reason"].values()) != rejected:
        print("    MISMATCH: rejected_by_reason does not add up to rejected", file=sys.stderr)
        return 1
    return 0


def cmd_stats(log, port, answers_path, previous_path=None):
    """Query a few customers and compare with the file; save (or compare with) the answers."""
    _, _, days = read_log(log)
    by_size = sorted(days, key=lambda c: sum(len(v) for v in days[c].values()))
    names = sorted(days, key=lambda c: (len(c), c))
    chosen = list(dict.fromkeys([names[0], names[len(names) // 2], names[-1], by_size[-1]]))
    all_days = sorted({d for c in days.values() for d in c})
    queries = [(c, all_days[0], all_days[-1]) for c in chosen]
    middle = all_days[len(all_days) // 2 - 1 : len(all_days) // 2 + 2]
    queries.append((chosen[0], middle[0], middle[-1]))
    errors, answers = [], {}
    for customer, start, end in queries:
        path = (f"/customers/{urllib.parse.quote(customer, safe='')}/stats?"
                f"from={start}&to={end}")
        status, body = http_get(int(port), path)
        answers[path] = body
        if status != 200:
            errors.append(f"{path}: HTTP {status} {body}")
            continue
        selected = {d: v for d, v in days[customer].items() if start <= d <= end}
        if [d["date"] for d in body["days"]] != sorted(selected):
            errors.append(f"{path}: days {[d['date'] for d in body['days']]} != {sorted(selected)}")
            continue
        for day in body["days"]:
            compare(f"{customer} {day['date']}", day, figures(selected[day["date"]]), errors)
        pooled = [item for v in selected.values() for item in v]
        want = figures(pooled)
        compare(f"{customer} {start}..{end} summary", body["summary"], want, errors)
        s = body["summary"]
        print(f"    {customer} {start}..{end}: {len(body['days'])} days, "
              f"{s['total_requests']} requests ({s['client_errors']} 4xx, "
              f"{s['server_errors']} 5xx), uptime {s['uptime_pct']}%, avg "
              f"{s['avg_latency_ms']} ms, p50 {s['median_latency_ms']} ms, p99 "
              f"{s['p99_latency_ms']} ms; expected {want['total_requests']} requests, uptime "
              f"{want['uptime_pct']:.3f}%, avg {want['avg_latency_ms']:.3f} ms, "
              f"p50 {want['p50']} ms, p99 {want['p99']} ms")
    status, body = http_get(int(port), f"/customers/nobody-{len(days)}/stats?from={all_days[0]}")
    print(f"    unknown customer: HTTP {status} {body}")
    if status != 404:
        errors.append(f"unknown customer: HTTP {status}, expected 404")
    if previous_path:
        with open(previous_path) as f:
            previous = json.load(f)
        same = previous == answers
        print(f"    answers identical to the first container's: {same}")
        if not same:
            errors.append("answers differ from the ones before the restart")
    with open(answers_path, "w") as f:
        json.dump(answers, f)
    for e in errors:
        print(f"    MISMATCH {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    sys.exit(globals()[f"cmd_{command}"](*args))
PYTHON
check() { python3 "$WORK/check.py" "$@"; }

# ---------------------------------------------------------------- engine
have_engine() { [ -n "$DOCKER" ] && timeout 20 "$DOCKER" info >/dev/null 2>&1; }

pick_client() {
    # Debian's client: the other one on the PATH may want a buildx plugin that is missing.
    if [ -x /usr/bin/docker ]; then
        DOCKER=/usr/bin/docker
    elif command -v docker >/dev/null && docker buildx version >/dev/null 2>&1; then
        DOCKER=$(command -v docker)
    else
        DOCKER=""
    fi
}

apt_install() {
    info "apt-get install -y --no-install-recommends $*"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@"; } >"$WORK/apt.log" 2>&1; then
        tail -n 20 "$WORK/apt.log" | sed 's/^/    | /'
        return 1
    fi
}

start_private_daemon() {
    local engine=$WORK/engine
    mkdir -p "$engine"
    # Its state on a tmpfs: on the development VM, deleting an engine's 20,000 files from disk
    # took a minute; unmounting takes no time. It holds about 500 MB at the end.
    if mount -t tmpfs -o "size=${STATSD_SMOKE_TMPFS_SIZE:-4g},mode=0700" statsd-smoke "$engine" \
        2>/dev/null; then
        ENGINE_TMPFS=$engine
        info "engine state on a tmpfs at $engine (up to ${STATSD_SMOKE_TMPFS_SIZE:-4g})"
    else
        info "no tmpfs could be mounted; engine state on disk in $engine"
    fi
    export DOCKER_HOST=unix://$engine/docker.sock
    info "dockerd --data-root $engine/data --exec-root $engine/exec --iptables=false --bridge=none"
    dockerd --data-root "$engine/data" --exec-root "$engine/exec" --host "$DOCKER_HOST" \
        --pidfile "$engine/dockerd.pid" --iptables=false --bridge=none \
        >"$engine/dockerd.log" 2>&1 &
    DAEMON_PID=$!
    for _ in $(seq 120); do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            wait "$DAEMON_PID" 2>/dev/null || true
            DAEMON_PID=""
            tail -n 15 "$engine/dockerd.log" | sed 's/^/    | /'
            return 1
        fi
        if "$DOCKER" info >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    tail -n 15 "$engine/dockerd.log" | sed 's/^/    | /'
    return 1
}

step "Finding a Docker engine"
pick_client
if have_engine; then
    info "using the running engine ($($DOCKER version -f '{{.Server.Version}}'), DOCKER_HOST=${DOCKER_HOST:-default})"
else
    info "no engine reachable; starting a private dockerd"
    [ "$(id -u)" = 0 ] || skip "no Docker engine is reachable, and starting one needs root"
    if [ "$DOCKER" != /usr/bin/docker ] || ! command -v dockerd >/dev/null; then
        command -v apt-get >/dev/null ||
            skip "no Docker engine is reachable, dockerd is not installed and there is no apt-get"
        apt_install docker.io || skip "no Docker engine is reachable and apt-get install docker.io failed"
        pick_client
    fi
    start_private_daemon ||
        skip "no Docker engine is reachable and a private dockerd did not start (log above)"
    info "private dockerd pid $DAEMON_PID, state in $WORK/engine, DOCKER_HOST=$DOCKER_HOST"
fi

# ---------------------------------------------------------------- base image
debian_mirror() {
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $3 ~ /^bookworm/ {print $2; exit}' /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

build_local_base() {
    if docker_ image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        info "$LOCAL_BASE is already in the engine"
        return 0
    fi
    if [ ! -s "$BASE_TARBALL" ]; then
        [ "$(id -u)" = 0 ] || fail "building $LOCAL_BASE with debootstrap needs root"
        if ! command -v debootstrap >/dev/null; then
            apt_install debootstrap || fail "apt-get install debootstrap failed"
        fi
        local mirror
        mirror=$(debian_mirror)
        info "debootstrap --variant=minbase --include=$BASE_PACKAGES bookworm <rootfs> $mirror"
        info "(1-3 minutes; the rootfs is then cached as $BASE_TARBALL)"
        if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm \
            "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1; then
            tail -n 20 "$WORK/debootstrap.log" | sed 's/^/    | /'
            fail "debootstrap failed"
        fi
        rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/*.bin \
            "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/debootstrap
        mkdir -p "$CACHE_DIR"
        tar --numeric-owner -C "$WORK/rootfs" -c . >"$BASE_TARBALL.part" && mv "$BASE_TARBALL.part" "$BASE_TARBALL"
        rm -rf "$WORK/rootfs"
    else
        info "reusing the cached rootfs $BASE_TARBALL"
    fi
    info "docker import $BASE_TARBALL $LOCAL_BASE"
    docker_ import - "$LOCAL_BASE" <"$BASE_TARBALL" >/dev/null || fail "docker import failed"
}

step "Choosing the base image"
if [ -n "${STATSD_BASE_IMAGE:-}" ]; then
    BASE=$STATSD_BASE_IMAGE
    info "STATSD_BASE_IMAGE=$BASE"
elif docker_ image inspect "$UPSTREAM_BASE" >/dev/null 2>&1; then
    BASE=$UPSTREAM_BASE
    info "$BASE is already in the engine"
elif timeout 90 "$DOCKER" pull -q "$UPSTREAM_BASE" >"$WORK/pull.log" 2>&1; then
    BASE=$UPSTREAM_BASE
    info "pulled $BASE"
else
    info "$UPSTREAM_BASE cannot be pulled: $(tail -n 1 "$WORK/pull.log")"
    BASE=$LOCAL_BASE
    build_local_base
fi
info "base image: $BASE"

# ---------------------------------------------------------------- build
step "Building $IMAGE"
CACERT=${STATSD_SMOKE_CACERT-/etc/ssl/certs/ca-certificates.crt}
build_args=(build --network host --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE")
if [ -n "$CACERT" ] && [ -f "$CACERT" ]; then
    build_args+=(--secret "id=cacert,src=$CACERT")
else
    info "no CA bundle handed to the build (the base image's own is used)"
fi
info "DOCKER_BUILDKIT=1 $DOCKER ${build_args[*]} ."
build_start=$SECONDS
DOCKER_BUILDKIT=1 BUILDKIT_PROGRESS=plain "$DOCKER" "${build_args[@]}" . >"$WORK/build.log" 2>&1 || {
    tail -n 30 "$WORK/build.log" | sed 's/^/    | /'
    fail "docker build failed"
}
size=$(docker_ image inspect -f '{{.Size}}' "$IMAGE")
base_size=$(docker_ image inspect -f '{{.Size}}' "$BASE")
info "built in $((SECONDS - build_start)) s; image size $((size / 1000000)) MB" \
    "($((base_size / 1000000)) MB of it the base image)"

# ---------------------------------------------------------------- run
read -r HTTP_PORT TCP_PORT < <(check ports) || true
[ -n "${TCP_PORT:-}" ] || fail "could not find two free ports"
docker_ volume create "$VOLUME" >/dev/null
VOLUME_MADE=1

run_server() {
    CURRENT=statsd-smoke-$1-$SUFFIX
    CONTAINERS+=("$CURRENT")
    info "docker run -d --network host -e STATS_HTTP_PORT=$HTTP_PORT -e STATS_TCP_PORT=$TCP_PORT -v $VOLUME:/data $IMAGE"
    docker_ run -d --name "$CURRENT" --network host \
        -e "STATS_HTTP_PORT=$HTTP_PORT" -e "STATS_TCP_PORT=$TCP_PORT" \
        -v "$VOLUME:/data" "$IMAGE" >/dev/null || fail "docker run failed"
    for _ in $(seq 120); do
        [ "$(docker_ inspect -f '{{.State.Running}}' "$CURRENT")" = true ] ||
            fail "the container $CURRENT exited: $(docker_ inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$CURRENT")"
        if check probe "$HTTP_PORT" /health && check probe "$HTTP_PORT" /ready; then
            info "/health and /ready answer 200 on port $HTTP_PORT"
            return 0
        fi
        sleep 0.5
    done
    fail "the server in $CURRENT did not answer /ready within 60 s"
}

step "Starting a container (volume $VOLUME)"
run_server first

step "Checking the container's user and contents"
config_user=$(docker_ inspect -f '{{.Config.User}}' "$CURRENT")
pid1_uid=$(docker_ exec "$CURRENT" sh -c 'awk "/^Uid:/ {print \$2}" /proc/1/status')
data_owner=$(docker_ exec "$CURRENT" stat -c '%u:%g' /data)
info "image USER $config_user; the server (PID 1) runs as uid $pid1_uid; /data owned by $data_owner"
[ "$pid1_uid" != 0 ] || fail "the server runs as root"
[ "${data_owner%%:*}" = "$pid1_uid" ] || fail "/data is not owned by the server's user"
tools=$(docker_ exec "$CURRENT" sh -c 'for t in gcc cc make /opt/venv/bin/pip; do command -v $t; done' || true)
[ -z "$tools" ] || fail "build tools in the final image: $tools"
info "no gcc, cc, make or pip in the final image"
check probe_outside "$HTTP_PORT" || fail "the server does not answer on a non-loopback address"

step "Generating $LINES log lines with tools/generator.py (1% malformed)"
GEN_PY=python3
[ -x "$ROOT/.venv/bin/python" ] && GEN_PY=$ROOT/.venv/bin/python
"$GEN_PY" tools/generator.py "$WORK/smoke.log" "$LINES" --seed 7 --customers 20 --days 10 \
    --bad-rate 0.01 || fail "tools/generator.py failed (it needs numpy: run make install)"
info "$WORK/smoke.log: $(wc -l <"$WORK/smoke.log") lines"

step "Sending the log over TCP port $TCP_PORT"
check ingest "$WORK/smoke.log" "$TCP_PORT" || fail "the ingest summary does not match the file"

step "Querying the stats endpoint and checking against the file"
check stats "$WORK/smoke.log" "$HTTP_PORT" "$WORK/answers1.json" ||
    fail "the stats do not match the figures computed from the file"

step "Waiting for Docker's own health status"
for _ in $(seq 90); do
    health=$(docker_ inspect -f '{{.State.Health.Status}}' "$CURRENT" || true)
    [ "$health" = healthy ] && break
    [ "$health" = unhealthy ] && fail "docker reports the container unhealthy"
    sleep 1
done
[ "$health" = healthy ] || fail "docker health status still '$health' after 90 s"
info "docker inspect: $health"

step "Stopping the container (SIGTERM; it writes its final snapshot)"
stop_start=$SECONDS
docker_ stop -t 30 "$CURRENT" >/dev/null
code=$(docker_ inspect -f '{{.State.ExitCode}}' "$CURRENT")
info "stopped in $((SECONDS - stop_start)) s, exit code $code"
[ "$code" = 0 ] || fail "the server exited with $code on docker stop"
docker_ rm "$CURRENT" >/dev/null

step "A new container on the same volume: the same answers"
run_server second
info "volume contents: $(docker_ exec "$CURRENT" ls -ln /data | awk 'NR > 1 {printf "%s (uid %s, %s bytes)  ", $9, $3, $5}')"
check stats "$WORK/smoke.log" "$HTTP_PORT" "$WORK/answers2.json" "$WORK/answers1.json" ||
    fail "the restarted server's answers differ"
docker_ stop -t 30 "$CURRENT" >/dev/null

step "Docker smoke test PASSED in $((SECONDS - START)) s (image $IMAGE from $BASE, $((size / 1000000)) MB)"
