#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests of `mcmi-lab run --executor slurm` (tests/test_slurm.py).
#
#   tools/slurm_cluster.sh start DIR   # munged (unless one answers already), slurmctld and slurmd, all state in DIR
#   export SLURM_CONF=DIR/slurm.conf   # then sinfo / sbatch / squeue talk to it
#   tools/slurm_cluster.sh stop DIR    # stops what `start` started, by the pids it recorded in DIR
#
# Needs root and Debian's slurm-wlm and munge packages (`apt-get install -y slurm-wlm munge`). The daemons use ports
# of their own (free ones, picked at start), proctrack/linuxproc and task/none (no cgroups), no accounting, and one
# partition `debug` holding this host with all its cores, reached at 127.0.0.1 (no name resolution needed).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

stop_pid_file() {  # kill the process a pid file names (if it still runs), wait for it to go
    local file=$1 pid
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$file"
}

start() {
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install -y slurm-wlm munge" >&2; exit 1; }
    done
    [[ $(id -u) -eq 0 ]] || { echo "starting SLURM daemons needs root" >&2; exit 1; }
    # munge: the key the package made (or a new one), one daemon per machine: reuse one that answers
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        if [[ ! -s /etc/munge/munge.key ]]; then
            head -c 1024 /dev/urandom >/etc/munge/munge.key
            chown munge:munge /etc/munge/munge.key
            chmod 400 /etc/munge/munge.key
        fi
        install -d -o munge -g munge -m 755 /run/munge
        runuser -u munge -- munged
        pgrep -u munge -n -x munged >"$dir/munged.pid"
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    local host mem
    host=$(hostname -s)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    mkdir -p "$dir/state" "$dir/spool"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=mcmitest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    slurmctld -f "$dir/slurm.conf" || { stop; exit 1; }
    slurmd -f "$dir/slurm.conf" || { stop; exit 1; }
    for _ in $(seq 100); do
        [[ $(SLURM_CONF=$dir/slurm.conf sinfo -h -o %t 2>/dev/null) == idle ]] && { echo "SLURM_CONF=$dir/slurm.conf"; return 0; }
        sleep 0.2
    done
    echo "the node did not become idle within 20 s (see $dir/slurmctld.log and $dir/slurmd.log)" >&2
    stop
    exit 1
}

stop() {
    stop_pid_file "$dir/slurmd.pid"
    stop_pid_file "$dir/slurmctld.pid"
    stop_pid_file "$dir/munged.pid"
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
