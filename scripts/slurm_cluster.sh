#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the cluster tests and for trying --executor slurm:
# Debian's slurmctld, slurmd and munge, configured in one folder, without accounting (as many lab
# clusters run), with this machine's cores.
#
#   scripts/slurm_cluster.sh install        apt-get the packages when they are missing (root only)
#   scripts/slurm_cluster.sh start DIR      write DIR/slurm.conf, start munged, slurmctld and slurmd
#   scripts/slurm_cluster.sh stop DIR       stop them (and cancel the jobs left)
#
# Clients find the cluster through SLURM_CONF: `export SLURM_CONF=DIR/slurm.conf` after `start`.
# Everything lives in DIR (keys, sockets, state, logs) but the daemons' ports (SLURMCTLD_PORT and
# SLURMD_PORT, SLURM's 6817 and 6818 by default), so `stop` and `rm -rf DIR` leave the machine as it was.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
               && command -v sbatch >/dev/null; }

install() {
    have_slurm && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "slurm_cluster: SLURM is not installed and cannot be here (needs root and apt-get): ${PACKAGES[*]}" >&2
        return 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    have_slurm
}

start() {
    local dir host cpus mem_mb ctld_port slurmd_port
    dir=$(realpath -m "$1")
    ctld_port=${SLURMCTLD_PORT:-6817} slurmd_port=${SLURMD_PORT:-6818}  # SLURM's own defaults
    for port in "$ctld_port" "$slurmd_port"; do  # another cluster here would answer in their place
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "slurm_cluster: port $port is taken (another SLURM on this machine?); stop it, or choose other" \
                 "ports with SLURMCTLD_PORT and SLURMD_PORT" >&2
            return 1
        fi
    done
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    host=$(hostname -s)
    cpus=${SLURM_CPUS:-$(nproc)}  # more than the cores lets more jobs run at once (the tests use 4)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

    # munge: its own key, socket and files, so a system munged (if any) is left alone.
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 700 "$dir/munge" && chmod 400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed"

    # cred_expire: also how long a requeued job waits before it may start again (SLURM's default, 120 s,
    # unless CRED_EXPIRE_S says otherwise: the tests use less). KillWait: a job past its limit gets SIGTERM, then SIGKILL this many seconds later.
    # MinJobAge: a finished job stays in squeue for this long, so a driver polling every few seconds
    # always sees it end. JobRequeue=1: jobs may be requeued (submitit's time-out handling does it).
    cat >"$dir/slurm.conf" <<EOF
ClusterName=depthbench
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=${CRED_EXPIRE_S:-120}
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=10
OverTimeLimit=0
MinJobAge=120
InactiveLimit=0
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    # Up when the node reports idle to the controller (a second or two).
    for _ in $(seq 60); do
        if sinfo -h -o '%t' 2>/dev/null | grep -qx 'idle'; then
            echo "SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "slurm_cluster: the node did not come up in 30 s; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    sinfo >&2 || true
    return 1
}

stop() {
    local dir
    dir=$(realpath -m "$1")
    export SLURM_CONF="$dir/slurm.conf"
    [ -f "$SLURM_CONF" ] && scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        if [ -f "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
        fi
    done
    # Jobs' processes (slurmstepd and its children) end with slurmd; wait for the daemons to go.
    for _ in $(seq 40); do
        local alive=0
        for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
            [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && return 0
        sleep 0.25
    done
    echo "slurm_cluster: daemons still running after 10 s" >&2
    return 1
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
