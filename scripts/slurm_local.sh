#!/usr/bin/env bash
# A single-node SLURM on this machine (Debian's slurm-wlm + munge) for trying out (and testing)
# `hydra/launcher=slurm`: munged, slurmctld and slurmd, one node with the machine's real cores and memory
# (`slurmd -C`), one partition `debug`; everything (config, state, spool, logs, munge socket) under DIR.
#
#   apt-get install -y slurm-wlm munge              # once, as root
#   scripts/slurm_local.sh up [DIR]                 # default DIR=/tmp/ckpteval-slurm; then: . DIR/env
#   scripts/slurm_local.sh status [DIR]             # sinfo
#   scripts/slurm_local.sh down [DIR]               # stop the daemons (their process groups) and delete DIR
#
# Accounting: no slurmdbd (it needs a MySQL/MariaDB server): jobcomp/filetxt writes every finished job to
# DIR/jobcomp.txt, which `sacct --completion` (-c) reads (plain `sacct` says "accounting storage is disabled");
# `scontrol show job ID` shows a job while slurmctld remembers it (MinJobAge=3600 s here).
# Settings (environment): SLURM_PORT (default 6817; slurmd uses SLURM_PORT+1), SLURM_PARTITION (default debug).
set -euo pipefail
cmd=${1:-status}
DIR=$(realpath -m "${2:-/tmp/ckpteval-slurm}")
PORT=${SLURM_PORT:-6817}
PARTITION=${SLURM_PARTITION:-debug}
NODE=$(hostname -s)
export SLURM_CONF="$DIR/slurm.conf"

pidof_file() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && cat "$1"; }

write_conf() {
  mkdir -p "$DIR"/{state,spool,log,munge}
  # the node line as slurmd itself measures it (CPUs, sockets, cores, threads, RealMemory); a little memory is
  # kept back for the OS so jobs asking for "all of it" are refused up front rather than OOM-killed
  local node mem
  node=$(slurmd -C | head -1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  node=$(sed "s/^NodeName=[^ ]*/NodeName=$NODE/; s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/" <<<"$node")
  cat >"$SLURM_CONF" <<EOF
ClusterName=ckpteval
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# containers have no (writable) cgroup hierarchy: track processes through /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
MinJobAge=3600
KillWait=10
SlurmdTimeout=60
$node State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  cat >"$DIR/env" <<EOF
export SLURM_CONF=$SLURM_CONF
EOF
}

up() {
  if pidof_file "$DIR/slurmctld.pid" >/dev/null; then echo "already running: . $DIR/env"; return; fi
  command -v slurmctld >/dev/null || { echo "error: no slurmctld: apt-get install -y slurm-wlm munge" >&2; exit 2; }
  write_conf
  setsid munged --socket="$DIR/munge/munge.socket.2" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed" --key-file=/etc/munge/munge.key --force \
    </dev/null >>"$DIR/log/munged.out" 2>&1
  setsid slurmctld -i -f "$SLURM_CONF" </dev/null >>"$DIR/log/slurmctld.out" 2>&1
  setsid slurmd -f "$SLURM_CONF" -N "$NODE" </dev/null >>"$DIR/log/slurmd.out" 2>&1
  # ready = the node is idle in the partition (slurmd registered with slurmctld)
  for _ in $(seq 120); do
    state=$(sinfo -h -N -o %T -n "$NODE" 2>/dev/null || true)
    if [ "$state" = idle ]; then
      echo "SLURM on $NODE: $(sinfo -h -N -o '%c CPUs, %m MB' -n "$NODE"), partition $PARTITION; clients: . $DIR/env"
      return
    fi
    sleep 0.5
  done
  echo "error: the node did not become idle (state: ${state:-none}); logs in $DIR/log" >&2
  tail -5 "$DIR"/log/*.log >&2 || true
  down
  exit 1
}

stop() {  # stop $1's daemon by its pid file, TERM then KILL
  local pid
  pid=$(pidof_file "$1") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}

down() {
  if [ -f "$SLURM_CONF" ] && pidof_file "$DIR/slurmctld.pid" >/dev/null; then
    scancel --partition="$PARTITION" 2>/dev/null || true  # jobs' processes go with their steps
  fi
  stop "$DIR/slurmd.pid"
  stop "$DIR/slurmctld.pid"
  stop "$DIR/munge/munged.pid"
  rm -rf "$DIR"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  status) sinfo -N -l ;;
  *) echo "usage: $0 up|down|status [DIR]" >&2; exit 2 ;;
esac
