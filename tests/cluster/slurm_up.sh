#!/usr/bin/env bash
# A real one-node SLURM for tests/cluster/test_slurm.py (and for trying
# examples/slurm/train.sbatch by hand).
#
#   tests/cluster/slurm_up.sh up DIR     install if missing, configure, start
#   tests/cluster/slurm_up.sh down DIR   cancel every job, stop the daemons
#
# `up` installs Debian's slurm-wlm and munge with apt-get when slurmctld or
# munged is missing (needs root), writes DIR/slurm.conf for this host (its
# CPUs, 127.0.0.1, free ports), starts munged (its own key and socket in
# DIR), slurmctld and slurmd as root, waits until the node is idle, and prints
# the line to use the cluster: export SLURM_CONF=DIR/slurm.conf.
#
# The cluster, as a site's would be for preemptible training:
#   partition `batch` (default): PreemptMode=REQUEUE with GraceTime, so a
#     preempted job's tasks get SIGTERM at once and SIGKILL after the grace
#     time (then the job is requeued);
#   partition `urgent`: a higher PriorityTier on the same node, whose jobs
#     preempt `batch` jobs (preempt/partition_prio);
#   JobRequeue=1, no RequeueExit rule (the batch script requeues itself),
#   no accounting database (sacct is not available; scontrol shows jobs for
#   MinJobAge seconds after they end).
# Daemons log to DIR/*.log; SLURM_TEST_GRACE_S, SLURM_TEST_KILL_WAIT_S
# change the preemption grace time (default 60) and KillWait (default 30).
set -euo pipefail

die() { echo "slurm_up.sh: $*" >&2; exit 1; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
      && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed, and only root can apt-get install them."
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed, and there is no apt-get to install them."
  echo "slurm_up.sh: installing slurm-wlm and munge (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # The packages' own services are not started (policy-rc.d, or no systemd);
  # this script runs its own daemons.
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for WHAT SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local what="$1" secs="$2"; shift 2
  local i
  for ((i = 0; i < secs * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  die "$what did not come up within ${secs} s; see the logs in $DIR"
}

node_idle() { [[ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" == idle ]]; }

up() {
  install_if_missing
  [[ $(id -u) == 0 ]] || die "the daemons run as root here (slurmd starts jobs as their user); run as root."
  mkdir -p "$DIR"/{state,spool}
  chmod 700 "$DIR"
  NODE="$(hostname -s)"
  # Jobs reach their first node by name (JAX's SLURM detection does).
  getent hosts "$NODE" >/dev/null \
    || die "this host's name ($NODE) does not resolve; add it to /etc/hosts."
  local cpus; cpus="$(nproc)"
  # munged: a key of our own; it refuses a key or socket directory that
  # others can write.
  if [[ ! -f "$DIR/munge.key" ]]; then
    dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge.key"
  fi
  local sock="$DIR/munge.socket"
  munged --force --socket="$sock" --key-file="$DIR/munge.key" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" \
    --seed-file="$DIR/munged.seed"
  wait_for munged 10 munge -n -S "$sock"

  cat > "$DIR/slurm.conf" <<EOF
# Written by tests/cluster/slurm_up.sh: one node, this host.
ClusterName=affectjaxtest
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again
# (default 120 s).
AuthInfo=socket=$sock,cred_expire=${SLURM_TEST_REQUEUE_DELAY_S:-10}
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=debug
SlurmdDebug=debug
# No cgroups in a container: track job processes by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Look at pending jobs (a requeued one, once eligible) every few seconds, not
# every 30-60 s.
SchedulerParameters=sched_interval=3,bf_interval=3
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Ended jobs stay visible to scontrol for 10 minutes.
MinJobAge=600
KillWait=${SLURM_TEST_KILL_WAIT_S:-30}
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=batch Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=${SLURM_TEST_GRACE_S:-60}
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
  export SLURM_CONF="$DIR/slurm.conf"
  echo "$NODE" > "$DIR/node"
  slurmctld -f "$SLURM_CONF" -i
  wait_for slurmctld 30 scontrol ping
  slurmd -f "$SLURM_CONF" -N "$NODE"
  wait_for "the node ($NODE)" 60 node_idle
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # stop_pidfile FILE: TERM the daemon, KILL it after 10 s.
  local pid i
  [[ -f "$1" ]] || return 0
  pid="$(cat "$1")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 40; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -KILL "$pid" 2>/dev/null || true
}

down() {
  [[ -f "$DIR/slurm.conf" ]] || return 0
  export SLURM_CONF="$DIR/slurm.conf"
  if scontrol ping >/dev/null 2>&1; then
    local jobs; jobs="$(squeue -h -o %i 2>/dev/null || true)"
    # shellcheck disable=SC2086  # one word per job id
    [[ -n "$jobs" ]] && scancel --quiet $jobs 2>/dev/null || true
    local i
    for ((i = 0; i < 120; i++)); do
      [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
      sleep 0.25
    done
  fi
  # Whatever did not end (slurmstepd outlives slurmd, and a task can outlive
  # its slurmstepd): this cluster's job processes and step daemons, known by
  # the SLURM_CONF in their environment.
  local env_file pid environ
  for env_file in /proc/[0-9]*/environ; do
    pid="${env_file#/proc/}"; pid="${pid%/environ}"
    [[ "$pid" == $$ ]] && continue
    environ="$({ tr '\0' '\n' < "$env_file"; } 2>/dev/null)" || continue
    grep -qx "SLURM_CONF=$DIR/slurm.conf" <<< "$environ" || continue
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmstepd ]] \
        || grep -q '^SLURM_JOB_ID=' <<< "$environ"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  stop_pidfile "$DIR/slurmd.pid"
  stop_pidfile "$DIR/slurmctld.pid"
  stop_pidfile "$DIR/munged.pid"
}

[[ $# == 2 ]] || { usage >&2; exit 2; }
DIR="$(mkdir -p "$2" && cd "$2" && pwd)"
case "$1" in
  up) up ;;
  down) down ;;
  *) usage >&2; exit 2 ;;
esac
