#!/usr/bin/env bash
# A real single-node SLURM (Debian's slurm-wlm + munge) for tests/test_slurm.py, started by hand
# (no systemd needed). Needs root.
#
#   bash tools/slurm_local.sh start    # install if missing, write the config, start munged/slurmctld/slurmd
#   bash tools/slurm_local.sh status   # sinfo, or why not
#   bash tools/slurm_local.sh stop     # stop the daemons this script started
#
# Idempotent: `start` on a running cluster only waits for the node to be idle.
# Config: /etc/slurm/slurm.conf (Debian's path). Logs: /var/log/slurm-local/{slurmctld,slurmd}.log,
# munged's in /var/log/munge/munged.log. State and spool: /var/lib/slurm-local.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # slurmctld, slurmd, munged live there; not on every user's PATH

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/lib/slurm-local
LOGS=/var/log/slurm-local
RUN=/run/slurm-local
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    [[ $(id -u) == 0 ]] || die "slurmctld is not installed and installing it needs root"
    log "installing slurm-wlm munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q slurm-wlm munge || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    log "starting munged (as the munge user)"
    install -d -m 0755 "$RUN" && touch "$RUN/munged.ours"  # `stop` ends only a munged that we started
    if id munge >/dev/null 2>&1 && command -v runuser >/dev/null; then
        runuser -u munge -- munged || munged --force
    else
        munged --force
    fi
    for _ in $(seq 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "munged does not answer; see /var/log/munge/munged.log"
}

write_conf() {
    local mem_mb cpus
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # a bit below the machine's
    cpus=$(nproc)
    install -d -m 0755 "$CONF_DIR" "$STATE" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
    if [[ -f $CONF ]] && ! head -n1 "$CONF" | grep -q "tools/slurm_local.sh"; then
        die "$CONF exists and is not ours: not overwriting a real cluster's config"
    fi
    cat >"$CONF.new" <<EOF
# Written by tools/slurm_local.sh: one node (localhost), everything as root, no accounting.
ClusterName=pcl-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire+1 s before it may start again (default 120 s); short for the tests
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
# schedule every few seconds (defaults: 60 s main, 30 s backfill), so a requeued job starts again soon
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=10
MinJobAge=300
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
}

node_state() { sinfo -h -N -n localhost -o %t 2>/dev/null | head -n1; }

wait_idle() {
    local state=""
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(node_state)
        case $state in
            idle*|mix*|alloc*) log "node localhost is $state"; return 0 ;;
            down*|drain*) scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node localhost not idle after ${WAIT_S}s (state: '${state:-no answer}'); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
}

start() {
    install_packages
    [[ $(id -u) == 0 ]] || die "starting the daemons needs root"
    start_munge
    if ! pid_alive "$RUN/slurmctld.pid" || ! pid_alive "$RUN/slurmd.pid"; then
        stop_daemons
        write_conf
        log "starting slurmctld and slurmd; logs in $LOGS"
        slurmctld -i || die "slurmctld did not start; see $LOGS/slurmctld.log"
        slurmd -N localhost || die "slurmd did not start; see $LOGS/slurmd.log"
    fi
    wait_idle
}

stop_pid() {  # stop_pid NAME PIDFILE: TERM, wait for the process itself (daemons unlink their pid file early), then KILL
    local name=$1 pidfile=$2 pid
    pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    log "stopped $name"
}

stop_daemons() {
    stop_pid slurmd "$RUN/slurmd.pid"
    stop_pid slurmctld "$RUN/slurmctld.pid"
}

stop() {
    stop_daemons
    [[ -f $RUN/munged.ours ]] && stop_pid munged /run/munge/munged.pid  # only a munged that we started
    rm -f "$RUN/munged.ours"
}

status() {
    if pid_alive "$RUN/slurmctld.pid" && pid_alive "$RUN/slurmd.pid" && sinfo 2>/dev/null; then
        return 0
    fi
    log "not running (see $LOGS)"
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
