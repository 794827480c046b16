#!/usr/bin/env bash
# A local Ray head for development and CI, every port bound to 127.0.0.1 (the dashboard and
# its Jobs API included). `ray.sh help` says how to use it.
set -euo pipefail

usage() {
	cat <<EOF
usage: bash cluster/ray/ray.sh {start|stop|status|address|help}

  start    start a Ray head on 127.0.0.1 and wait until its Jobs API answers. A no-op
           when one started by this script is already up.
  stop     stop every Ray process on this machine at once (ray stop --force: SIGKILL)
  status   exit 0 when the head answers, 3 otherwise
  address  print the Jobs API address trainyard needs (cluster.address / RAY_ADDRESS)

Environment (read by start):
  RAY_NUM_CPUS=<cores>       CPUs the head offers to tasks (default: this machine's cores)
  RAY_NUM_GPUS=<detected>    GPUs it offers (default: what Ray detects)
  RAY_GCS_PORT=6380          the cluster's own port (workers and drivers join through it)
  RAY_DASHBOARD_PORT=8265    the dashboard and the Jobs API that trainyard submits to
  TRAINYARD_RAY_DIR          Ray's session files and logs (default $DIR_DEFAULT)
  RAY_JOB_STOP_WAIT_TIME_S=60  how long a stopped job's trials get to checkpoint
  RAY_BIN                    the ray command (default: the one next to python3 on PATH,
                             or .venv/bin/ray)

Then: cluster=ray sends trials here (address http://127.0.0.1:\$RAY_DASHBOARD_PORT),
      e.g. trainyard-train -m cluster=ray optimizer.lr=1e-3,1e-2
EOF
}

DIR_DEFAULT=/tmp/trainyard-ray
DIR=${TRAINYARD_RAY_DIR:-$DIR_DEFAULT}
GCS_PORT=${RAY_GCS_PORT:-6380}
DASH_PORT=${RAY_DASHBOARD_PORT:-8265}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

log() { printf '[ray] %s\n' "$*"; }

ray_bin() {
	if [ -n "${RAY_BIN:-}" ]; then echo "$RAY_BIN"; return; fi
	if [ -x "$ROOT/.venv/bin/ray" ]; then echo "$ROOT/.venv/bin/ray"; return; fi
	command -v ray || { echo "no ray command: make install (or pip install 'trainyard[ray]')" >&2; exit 2; }
}

answers() {
	# up when the Jobs API (what trainyard talks to) lists jobs and a node is alive (the
	# dashboard outlives a head whose other processes died)
	python3 - "$DASH_PORT" <<'PY' >/dev/null 2>&1
import json, os, pathlib, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
# a head started where a Ray auth token exists requires it (Ray 2.60's token auth)
path = os.environ.get("RAY_AUTH_TOKEN_PATH") or pathlib.Path.home() / ".ray" / "auth_token"
token = os.environ.get("RAY_AUTH_TOKEN") or (
    pathlib.Path(path).read_text().strip() if pathlib.Path(path).is_file() else "")
headers = {"Authorization": f"Bearer {token}"} if token else {}
get = lambda url: urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5).read()
get(f"{base}/api/jobs/")
nodes = json.loads(get(f"{base}/api/v0/nodes"))
assert any(n["state"] == "ALIVE" for n in nodes["data"]["result"]["result"])
PY
}

start() {
	if answers; then log "already up: http://127.0.0.1:$DASH_PORT"; return; fi
	# whatever is left of a head that died (a dashboard without its node) goes first
	"$(ray_bin)" stop --force >/dev/null 2>&1 || true
	mkdir -p "$DIR"
	local args=(--head --node-ip-address=127.0.0.1 --port="$GCS_PORT"
		--dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --include-dashboard=true
		--temp-dir="$DIR" --disable-usage-stats)
	[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
	[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$RAY_NUM_GPUS")
	# Ray replaces 127.0.0.1 with the machine's outward address unless it believes it runs
	# on a laptop (this switch): then every component binds loopback, nothing else
	# a stopped job's driver asks its trials to checkpoint; Ray kills it after this long
	export RAY_JOB_STOP_WAIT_TIME_S=${RAY_JOB_STOP_WAIT_TIME_S:-60}
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$(ray_bin)" start "${args[@]}" >"$DIR/start.log" 2>&1 || {
		tail -20 "$DIR/start.log" >&2
		log "failed to start (log: $DIR/start.log)"
		exit 1
	}
	for _ in $(seq 1 60); do
		if answers; then log "up: http://127.0.0.1:$DASH_PORT (session files: $DIR)"; return; fi
		sleep 1
	done
	log "started, but the Jobs API at 127.0.0.1:$DASH_PORT did not answer in 60 s"
	exit 1
}

stop() {
	"$(ray_bin)" stop --force >/dev/null 2>&1 || true
	log "stopped"
}

case "${1:-help}" in
start) start ;;
stop) stop ;;
status) if answers; then log "up: http://127.0.0.1:$DASH_PORT"; else log "down"; exit 3; fi ;;
address) echo "http://127.0.0.1:$DASH_PORT" ;;
help | -h | --help) usage ;;
*) usage >&2; exit 2 ;;
esac
