#!/bin/bash
# A private Slurm cluster on this host, for tests and for trying `ablate launch --slurm` on one
# machine: two slurmd "nodes" (n1, n2) on 127.0.0.1, a private munged, and every port, PID file,
# state, spool and log under DIR. Nothing system-wide is configured (no /etc/slurm, no system
# munged); SLURM_CONF points at DIR/slurm.conf.
#
#   launch/local_slurm.sh start DIR    # install slurm-wlm + munge if missing (root only), start, wait idle
#   export SLURM_CONF=DIR/slurm.conf   # then sbatch / srun / squeue / scontrol use it
#   launch/local_slurm.sh stop DIR     # stop what start started, by PID
#
# Exit status of start: 0 up, 3 Slurm is not installed and cannot be (not root), 1 it did not come up.
set -euo pipefail
cmd=${1:?usage: local_slurm.sh start|stop DIR}
S=$(realpath -m "${2:?usage: local_slurm.sh start|stop DIR}")

stop_pid() {       # TERM, wait up to 10 s, then KILL
  [ -s "$1" ] || return 0
  local p; p=$(cat "$1")
  kill -TERM "$p" 2>/dev/null || { rm -f "$1"; return 0; }
  for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || { rm -f "$1"; return 0; }; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true; rm -f "$1"
}

if [ "$cmd" = stop ]; then
  [ -s "$S/slurm.conf" ] && SLURM_CONF="$S/slurm.conf" scancel --full --user="$(id -un)" 2>/dev/null || true
  for f in "$S"/slurmd-*.pid; do stop_pid "$f"; done
  stop_pid "$S/slurmctld.pid"
  stop_pid "$S/munge/munged.pid"
  exit 0
fi
[ "$cmd" = start ] || { echo "unknown command $cmd (start | stop)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ] || [ -t 0 ]; then
    echo "slurm-wlm / munge are not installed (installing needs root, non-interactively)" >&2; exit 3
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; }
fi

mkdir -p "$S/state" "$S/spool/n1" "$S/spool/n2" "$S/log" "$S/munge"
# munge: a private key, socket, pid and log, run as the calling user (the daemon refuses
# group/world-writable dirs)
chmod 700 "$S/munge"
[ -s "$S/munge/munge.key" ] || { dd if=/dev/urandom bs=1 count=1024 of="$S/munge/munge.key" 2>/dev/null; chmod 400 "$S/munge/munge.key"; }
SOCK="$S/munge/munge.socket"
munged --force --key-file="$S/munge/munge.key" --socket="$SOCK" --pid-file="$S/munge/munged.pid" \
  --seed-file="$S/munge/munged.seed" --log-file="$S/munge/munged.log"

# private ports: derived from DIR, so two clusters on one box do not collide
BASE=$(( 20000 + $(printf '%s' "$S" | cksum | cut -d' ' -f1) % 20000 ))
USER_NAME=$(id -un)
cat > "$S/slurm.conf" <<CONF
ClusterName=ablate
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$BASE
SlurmdPort=$((BASE + 1))
SlurmUser=$USER_NAME
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=5
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
NodeName=n[1-2] NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$((BASE + 2))-$((BASE + 3)) CPUs=4 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$S/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N n1
slurmd -f "$SLURM_CONF" -N n2
for _ in $(seq 1 200); do
  [ "$(sinfo -h -o %T 2>/dev/null | sort -u)" = idle ] && { echo "slurm up: SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.1
done
echo "slurm did not come up" >&2; sinfo -N -l >&2 || true; tail -20 "$S"/log/*.log >&2 || true; exit 1
