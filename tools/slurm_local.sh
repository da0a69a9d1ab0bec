#!/usr/bin/env bash
# A real single-node SLURM (Debian's slurm-wlm + munge) with accounting (slurmdbd on MariaDB), for
# tests/test_slurm.py, started by hand (no systemd needed). Needs root.
#
#   bash tools/slurm_local.sh start    # install if missing, write the configs, start munged, MariaDB, slurmdbd,
#                                      # slurmctld and slurmd; register the cluster; wait for an idle node
#   bash tools/slurm_local.sh start --nodes 2   # two nodes on this machine: node1 and node2, each a slurmd in its
#                                      # own UTS namespace (its hostname) at its own loopback address (127.0.0.2,
#                                      # 127.0.0.3, in /etc/hosts) and port, with its own spool, pid and log files.
#                                      # Partition `two` = both; the default partition `local` is node1 alone, so
#                                      # single-node jobs run as before. (SLURM treats a lone node named localhost
#                                      # as a wildcard, hence other names here.)
#   bash tools/slurm_local.sh status   # sinfo and sacct, or why not
#   bash tools/slurm_local.sh stop     # stop the daemons this script started
#
# Idempotent: `start` on a running cluster whose config is unchanged only waits for the node to be
# idle; a changed slurm.conf (e.g. an older version of this script's) restarts slurmctld and slurmd.
# Configs: /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf (Debian's paths; slurmdbd.conf mode 600,
# owned by the slurm user, as slurmdbd demands). Logs: /var/log/slurm-local/{slurmctld,slurmd,slurmdbd,
# mariadb}.log, munged's in /var/log/munge/munged.log. State and spool: /var/lib/slurm-local.
# The accounting database (slurm_acct_db) lives in MariaDB's own data folder (/var/lib/mysql); a MariaDB
# that is already running (its socket answers) is used as it is and never stopped by `stop`.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # slurmctld, slurmd, slurmdbd, munged live there; not on every user's PATH

CLUSTER=pcl-local
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
STATE=/var/lib/slurm-local
LOGS=/var/log/slurm-local
RUN=/run/slurm-local
DB_SOCKET=/run/mysqld/mysqld.sock
DB_NAME=slurm_acct_db
DB_USER=slurm
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
PARTITION_MAX_MIN=${SLURM_LOCAL_MAX_TIME_MIN:-60}  # the partition's MaxTime: the launcher refuses a longer slurm.time
NODES=1  # start --nodes 2: two nodes
NODE_NAMES=(node1 node2)
NODE_ADDRS=(127.0.0.2 127.0.0.3)  # loopback: no traffic leaves the machine
NODE_PORTS=(6818 6820)  # one slurmd port each: SlurmdPort's default, then one that slurmctld (6817) and slurmdbd (6819) leave free

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mysqld_safe >/dev/null || missing+=(mariadb-server)
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "${missing[*]} not installed, and installing needs root"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # the packages' scripts must not start the services themselves: this script starts them (no systemd here)
    local policy=/usr/sbin/policy-rc.d ours_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && ours_policy=1
    fi
    local rc=0
    { apt-get update -q && apt-get install -y -q "${missing[@]}"; } || rc=$?
    ((ours_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install ${missing[*]} failed (rc $rc)"
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

db_answers() { mariadb-admin --socket="$DB_SOCKET" -u root ping >/dev/null 2>&1; }
db() { mariadb --socket="$DB_SOCKET" -u root --batch --skip-column-names "$@"; }

start_mariadb() {
    install -d -m 0755 "$LOGS" "$RUN"
    if db_answers; then
        return 0
    fi
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        log "initialising MariaDB's data folder /var/lib/mysql"
        install -d -o mysql -g mysql -m 0755 /var/lib/mysql
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOGS/mariadb.log" 2>&1 \
            || die "mariadb-install-db failed; see $LOGS/mariadb.log"
    fi
    install -d -o mysql -g root -m 0755 /run/mysqld
    touch "$LOGS/mariadb.log" && chown mysql:mysql "$LOGS/mariadb.log"  # mariadbd runs as mysql and appends to it
    log "starting MariaDB (mysqld_safe, socket only); log in $LOGS/mariadb.log"
    touch "$RUN/mariadb.ours"  # `stop` shuts down only a MariaDB that we started
    # in the background and in its own session, so that it outlives this script and the shell that ran it
    setsid nohup mysqld_safe --user=mysql --skip-networking --socket="$DB_SOCKET" \
        --innodb-lock-wait-timeout=900 --log-error="$LOGS/mariadb.log" </dev/null >>"$LOGS/mariadb.log" 2>&1 &
    for _ in $(seq $((WAIT_S * 2))); do
        [[ -S $DB_SOCKET ]] && db_answers && return 0
        sleep 0.5
    done
    die "MariaDB does not answer on $DB_SOCKET after ${WAIT_S}s; see $LOGS/mariadb.log"
}

db_password() {  # the one in our slurmdbd.conf, else a new random one
    if [[ -f $DBD_CONF ]] && head -n1 "$DBD_CONF" | grep -q "tools/slurm_local.sh"; then
        sed -n 's/^StoragePass=//p' "$DBD_CONF" | head -n1
    else
        head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 20
    fi
}

write_dbd_conf() {
    local pass=$1
    if [[ -f $DBD_CONF ]] && ! head -n1 "$DBD_CONF" | grep -q "tools/slurm_local.sh"; then
        die "$DBD_CONF exists and is not ours: not overwriting a real cluster's config"
    fi
    install -d -m 0755 "$CONF_DIR"
    install -d -o slurm -g slurm -m 0755 "$RUN/dbd"
    touch "$LOGS/slurmdbd.log" && chown slurm:slurm "$LOGS/slurmdbd.log"
    (
        umask 077
        cat >"$DBD_CONF.new" <<EOF
# Written by tools/slurm_local.sh: the accounting daemon of the local cluster, storing in MariaDB.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
DebugLevel=info
LogFile=$LOGS/slurmdbd.log
PidFile=$RUN/dbd/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$pass
StorageLoc=$DB_NAME
EOF
    )
    chown slurm:slurm "$DBD_CONF.new" && chmod 0600 "$DBD_CONF.new"
    mv "$DBD_CONF.new" "$DBD_CONF"
}

dbd_answers() { sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }

start_slurmdbd() {
    local pass
    pass=$(db_password)
    [[ -n $pass ]] || die "no database password"
    # the database and its user; idempotent (the password is set again each time)
    db -e "CREATE DATABASE IF NOT EXISTS $DB_NAME;
           CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
           ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
           GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
           FLUSH PRIVILEGES;" || die "could not create the database $DB_NAME and its user in MariaDB"
    local before=""
    [[ -f $DBD_CONF ]] && before=$(cat "$DBD_CONF")
    write_dbd_conf "$pass"
    if pid_alive "$RUN/dbd/slurmdbd.pid" && [[ $before == "$(cat "$DBD_CONF")" ]] && dbd_answers; then
        return 0
    fi
    stop_pid slurmdbd "$RUN/dbd/slurmdbd.pid"
    log "starting slurmdbd; log in $LOGS/slurmdbd.log"
    slurmdbd || die "slurmdbd did not start; see $LOGS/slurmdbd.log"
    for _ in $(seq $((WAIT_S * 2))); do
        dbd_answers && return 0
        sleep 0.5
    done
    die "slurmdbd does not answer after ${WAIT_S}s; see $LOGS/slurmdbd.log"
}

register_cluster() {
    if ! sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        log "registering cluster $CLUSTER with slurmdbd"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
    fi
}

write_conf() {  # write_conf FILE: the slurm.conf this script wants
    local mem_mb cpus node_suffix="" what="one node (localhost)"
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # a bit below the machine's
    cpus=$(nproc)
    if ((NODES == 2)); then
        node_suffix="-%n"  # one spool, pid and log file per slurmd (%n: its node name)
        what="two nodes (node1, node2: each slurmd in its own UTS namespace)"
    fi
    cat >"$1" <<EOF
# Written by tools/slurm_local.sh: $what, everything as root, accounting in slurmdbd.
ClusterName=$CLUSTER
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
SlurmdSpoolDir=$STATE/d$node_suffix
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd$node_suffix.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd$node_suffix.log
SlurmctldDebug=info
SlurmdDebug=info
# accounting as on real clusters: sacct answers (submitit reads job states from it)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=10
MinJobAge=300
Waittime=0
EOF
    if ((NODES == 1)); then
        cat >>"$1" <<EOF
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=$PARTITION_MAX_MIN State=UP
EOF
        return 0
    fi
    local i
    for i in 0 1; do  # each node: the machine's cores again (every job here asks for what it uses)
        echo "NodeName=${NODE_NAMES[i]} NodeAddr=${NODE_ADDRS[i]} Port=${NODE_PORTS[i]} CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >>"$1"
    done
    cat >>"$1" <<EOF
PartitionName=local Nodes=${NODE_NAMES[0]} Default=YES MaxTime=$PARTITION_MAX_MIN State=UP
PartitionName=two Nodes=${NODE_NAMES[0]},${NODE_NAMES[1]} MaxTime=$PARTITION_MAX_MIN State=UP
EOF
}

nodes() { if ((NODES == 2)); then echo "${NODE_NAMES[@]}"; else echo localhost; fi; }

node_pidfile() {  # node_pidfile NODE: where its slurmd writes its pid
    if ((NODES == 2)); then echo "$RUN/slurmd-$1.pid"; else echo "$RUN/slurmd.pid"; fi
}

hosts_entries() {  # each node's name resolves to its loopback address (its tasks and torch's rendezvous use it)
    local i
    for i in 0 1; do
        grep -qE "^${NODE_ADDRS[i]}[[:space:]]+${NODE_NAMES[i]}([[:space:]]|\$)" /etc/hosts && continue
        log "adding '${NODE_ADDRS[i]} ${NODE_NAMES[i]}' to /etc/hosts"
        printf '%s %s\n' "${NODE_ADDRS[i]}" "${NODE_NAMES[i]}" >>/etc/hosts
    done
}

start_slurmd() {  # start_slurmd NODE: with two nodes in its own UTS namespace, so `hostname` in its tasks is NODE
    local node=$1
    if ((NODES == 1)); then
        slurmd -N "$node" || die "slurmd did not start; see $LOGS/slurmd.log"
        return 0
    fi
    install -d -m 0755 "$STATE/d-$node"
    unshare --uts /bin/sh -c "hostname $node && exec slurmd -N $node" \
        || die "slurmd of $node did not start; see $LOGS/slurmd-$node.log"
}

node_state() { sinfo -h -N -n "$1" -o %t 2>/dev/null | head -n1; }

wait_idle() {  # wait_idle NODE
    local node=$1 state=""
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(node_state "$node")
        case $state in
            idle*|mix*|alloc*) log "node $node is $state"; return 0 ;;
            down*|drain*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $node not idle after ${WAIT_S}s (state: '${state:-no answer}'); see $LOGS/slurmctld.log and $LOGS/slurmd*.log"
}


start() {
    install_packages
    [[ $(id -u) == 0 ]] || die "starting the daemons needs root"
    install -d -m 0755 "$CONF_DIR" "$STATE" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
    if [[ -f $CONF ]] && ! head -n1 "$CONF" | grep -q "tools/slurm_local.sh"; then
        die "$CONF exists and is not ours: not overwriting a real cluster's config"
    fi
    start_munge
    start_mariadb
    if ((NODES == 2)); then hosts_entries; fi
    write_conf "$CONF.new"
    local restart=0 node
    for node in $(nodes); do pid_alive "$(node_pidfile "$node")" || restart=1; done
    if ! cmp -s "$CONF.new" "$CONF" || ! pid_alive "$RUN/slurmctld.pid" || ((restart)); then
        restart=1
        stop_daemons
        mv "$CONF.new" "$CONF"  # sacctmgr below reads it too (AccountingStorageType)
    else
        rm -f "$CONF.new"
    fi
    start_slurmdbd
    register_cluster  # before slurmctld starts: it registers with slurmdbd under ClusterName
    if ((restart)); then
        log "starting slurmctld and slurmd; logs in $LOGS"
        slurmctld -i || die "slurmctld did not start; see $LOGS/slurmctld.log"
        for node in $(nodes); do start_slurmd "$node"; done
    fi
    for node in $(nodes); do wait_idle "$node"; done
    sacct -n -X -S now-1minutes >/dev/null 2>&1 || die "sacct does not answer; see $LOGS/slurmdbd.log and $LOGS/slurmctld.log"
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

stop_daemons() {  # every slurmd this script may have started (one node or two), then slurmctld
    local pidfile
    for pidfile in "$RUN/slurmd.pid" "$RUN"/slurmd-*.pid; do
        if [[ -e $pidfile ]]; then stop_pid "slurmd ($(basename "$pidfile" .pid))" "$pidfile"; fi
    done
    stop_pid slurmctld "$RUN/slurmctld.pid"
}

stop_mariadb() {
    [[ -f $RUN/mariadb.ours ]] || return 0
    if db_answers; then
        mariadb-admin --socket="$DB_SOCKET" -u root shutdown >/dev/null 2>&1 || true  # mysqld_safe ends with it
        for _ in $(seq 60); do db_answers || break; sleep 0.5; done
        log "stopped MariaDB"
    fi
    rm -f "$RUN/mariadb.ours"
}

stop() {
    stop_daemons
    stop_pid slurmdbd "$RUN/dbd/slurmdbd.pid"
    stop_mariadb
    [[ -f $RUN/munged.ours ]] && stop_pid munged /run/munge/munged.pid  # only a munged that we started
    rm -f "$RUN/munged.ours"
}

status() {
    if pid_alive "$RUN/slurmctld.pid" && sinfo 2>/dev/null; then
        if sacct -n -X -S now-1minutes >/dev/null 2>&1; then
            log "accounting: sacct answers (slurmdbd $(pid_alive "$RUN/dbd/slurmdbd.pid" && echo running || echo "not ours"))"
            return 0
        fi
        log "sinfo answers but sacct does not (see $LOGS/slurmdbd.log)"
        return 1
    fi
    log "not running (see $LOGS)"
    return 1
}

case "${1:-}" in
    start)
        case "${2:-} ${3:-}" in
            " " | "--nodes 1") ;;
            "--nodes 2") NODES=2 ;;
            *) echo "usage: $0 start [--nodes 1|2]" >&2; exit 2 ;;
        esac
        start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start [--nodes 1|2] | stop | status" >&2; exit 2 ;;
esac
