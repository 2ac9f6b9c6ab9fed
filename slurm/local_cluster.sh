#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, for CI and for trying the templates without a cluster:
#
#   sudo bash slurm/local_cluster.sh up       # install slurm-wlm + munge if missing, start munged, slurmctld, slurmd
#   bash slurm/local_cluster.sh status        # sinfo + squeue
#   sudo bash slurm/local_cluster.sh down     # stop the daemons this script started
#
# One node (this host, `nproc` CPUs, no GPUs) in one partition, `local`. Memory is not a consumable
# resource, so jobs must not ask for --mem. The config goes to /etc/slurm/slurm.conf; a config this
# script did not write is never overwritten.
set -euo pipefail

STATE=${SANDLAB_SLURM_STATE:-/var/lib/sandlab-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by sandlab slurm/local_cluster.sh"
NODE=$(hostname -s)

die() { echo "local_cluster: $*" >&2; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and this is not root (apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get"
  echo "local_cluster: installing slurm-wlm and munge" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    mkdir -p "$STATE" && touch "$STATE/started-munged"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    die "munged did not start"
  fi
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite it"
  fi
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
  cat >"$CONF" <<EOF
$MARKER
ClusterName=sandlab-local
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
# How long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=20
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
MinJobAge=3600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  [ "$(id -u)" = 0 ] || die "run as root: the daemons and /etc/slurm need it"
  install_packages
  start_munge
  write_conf
  # -c: a clean state, no jobs left from before. `down` stops only the daemons that `up` started.
  if ! pgrep -x slurmctld >/dev/null; then slurmctld -c && touch "$STATE/started-slurmctld"; fi
  if ! pgrep -x slurmd >/dev/null; then slurmd && touch "$STATE/started-slurmd"; fi
  for _ in $(seq 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -n1 || true)
    case "$state" in idle|mix|alloc) echo "local_cluster: up (node $NODE, $(nproc) CPUs, partition local)"; return;; esac
    [ "$state" = "down" ] || [ "$state" = "drain" ] && scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    sleep 1
  done
  die "the node did not come up; see $STATE/log/"
}

down() {
  local stopped=()
  for daemon in slurmd slurmctld munged; do  # only what `up` started: a host may run its own
    if [ -f "$STATE/started-$daemon" ]; then
      pkill -x "$daemon" 2>/dev/null || true
      rm -f "$STATE/started-$daemon"
      stopped+=("$daemon")
    fi
  done
  for _ in $(seq 100); do
    local running=()
    for daemon in "${stopped[@]}"; do pgrep -x "$daemon" >/dev/null && running+=("$daemon"); done
    [ ${#running[@]} -eq 0 ] && { echo "local_cluster: down (stopped: ${stopped[*]:-none})"; return; }
    sleep 0.1
  done
  die "still running: ${running[*]}"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo && squeue ;;
  *) die "usage: $0 up|down|status" ;;
esac
