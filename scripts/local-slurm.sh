#!/usr/bin/env bash
# A single-node Slurm cluster on localhost, for the Slurm tests, CI, and trying `scaling run --executor slurm`.
#
#   sudo scripts/local-slurm.sh start    # install if needed, configure, start munged + slurmctld + slurmd
#   sudo scripts/local-slurm.sh status   # which daemons run, and `sinfo`
#   sudo scripts/local-slurm.sh stop     # stop exactly the daemons `start` started
#
# It needs root and works without systemd (containers, CI runners). What `start` does, which is also the recipe
# for doing it by hand:
#   1. install Debian's packages if `slurmctld` is missing:
#        apt-get update && apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
#   2. write /etc/slurm/slurm.conf: one partition `debug` with one node, this machine, as `slurmd -C` describes
#      it, reached at 127.0.0.1; no accounting (so `sacct` does not work and nothing may rely on it). The file
#      is written only when absent or when this script wrote it (first line below), so a real cluster's
#      configuration is never overwritten.
#   3. munge (Slurm's authentication): a key /etc/munge/munge.key (munge:munge, 0400), a runtime dir /run/munge
#      owned by munge, then `munged -F` run as user munge.
#   4. `slurmctld -D` (the controller); once `scontrol ping` answers, `slurmd -D` (the node daemon); then wait
#      until the node has registered and `sinfo` shows it idle.
# The daemons run in the foreground of their own session; their PIDs are kept in $STATE_DIR and `stop` signals
# only those. `start` is idempotent; `status` exits 3 when a daemon is not running. Logs: $LOG_DIR. Jobs and
# their ids survive stop/start (state in $HOME_DIR). Overrides: LOCAL_SLURM_STATE_DIR, LOCAL_SLURM_HOME,
# LOCAL_SLURM_WAIT_S (seconds to wait for the node, default 90).
#
# Worth knowing when testing with it: Slurm keeps a requeued job pending for about two minutes (reason
# BeginTime); `scontrol update JobId=ID StartTime=now` lets it start at once.
set -euo pipefail

STATE_DIR=${LOCAL_SLURM_STATE_DIR:-/run/scaling-slurm}   # PID files of the daemons started here
HOME_DIR=${LOCAL_SLURM_HOME:-/var/lib/scaling-slurm}     # controller state, slurmd spool, logs
LOG_DIR=$HOME_DIR/log
WAIT_S=${LOCAL_SLURM_WAIT_S:-90}
CONF=/etc/slurm/slurm.conf
MARK="# Written by scripts/local-slurm.sh (scaling): a single-node test cluster. Edit this line away to keep the file."
MUNGE_KEY=/etc/munge/munge.key
DAEMONS=(munged slurmctld slurmd)    # start order; stop goes in reverse
export PATH=$PATH:/usr/sbin:/sbin

say() { echo "local-slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }
need_root() { [[ $(id -u) == 0 ]] || die "'$1' needs root (sudo $0 $1)"; }

pid_of() { cat "$STATE_DIR/$1.pid" 2>/dev/null || true; }

# running PID NAME: whether process PID runs program NAME and is not a zombie (killed daemons can stay zombies
# for a while where PID 1 is slow to reap them, as in some containers).
running() {
    local stat
    [[ -n $1 && $(cat "/proc/$1/comm" 2>/dev/null) == "$2" ]] || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ ${stat##*) } != Z* ]]
}

# Whether the daemon started here is alive.
alive() { running "$(pid_of "$1")" "$1"; }

# Whether a daemon of that name runs that this script did not start.
foreign() {
    local pid
    for pid in $(pgrep -x "$1"); do
        [[ $pid != "$(pid_of "$1")" ]] && running "$pid" "$1" && return 0
    done
    return 1
}

log_tail() {
    local name=$1 file
    for file in "$LOG_DIR/$name.out" "$LOG_DIR/$name.log"; do
        if [[ -s $file ]]; then
            echo "--- last lines of $file:" >&2
            tail -n 25 "$file" >&2
        fi
    done
}

STARTED=()   # daemons this invocation started, which a failed start stops again

fail() {   # fail DAEMON MESSAGE: report with the daemon's log tail, stop what this run started, exit non-zero
    say "error: $2"
    log_tail "$1"
    local d
    for d in "${STARTED[@]}"; do stop_one "$d" quiet; done
    exit 1
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
        && command -v munged >/dev/null && return 0
    say "installing slurmctld, slurmd, slurm-client and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    if [[ -e $CONF ]] && [[ $(head -n 1 "$CONF") != "$MARK" ]]; then
        die "$CONF exists and was not written by this script; not touching it (move it away to use this script)"
    fi
    local node hw cpus mem
    node=$(hostname -s)
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    hw=$(slurmd -C | head -n 1) || die "'slurmd -C' failed"
    [[ $hw == NodeName=* ]] || die "unexpected 'slurmd -C' output: $hw"
    cpus=$(grep -o 'CPUs=[0-9]*' <<<"$hw" | cut -d= -f2)
    mem=$(grep -o 'RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2)
    # A node whose configured memory exceeds what slurmd measures is drained ("Low RealMemory"): keep a margin.
    mem=$(( mem * 95 / 100 ))
    hw=$(sed -E "s/^NodeName=[^ ]+ //; s/RealMemory=[0-9]+/RealMemory=$mem/" <<<"$hw")
    mkdir -p "$(dirname "$CONF")"
    cat >"$CONF.tmp" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$HOME_DIR/slurmctld
SlurmdSpoolDir=$HOME_DIR/slurmd
SlurmctldPidFile=$STATE_DIR/slurmctld.own.pid
SlurmdPidFile=$STATE_DIR/slurmd.own.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# A node that was down (e.g. the daemons were stopped) comes back by itself when its slurmd registers.
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued (default 30).
KillWait=5
# Without a default, a job with no --mem gets the whole node's memory and jobs run one at a time.
DefMemPerCPU=$(( mem / cpus ))
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

setup_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        say "creating $MUNGE_KEY"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# launch NAME COMMAND...: run a daemon in the foreground of its own session (setsid execs, so $! is the
# daemon's own PID), output appended to $LOG_DIR/NAME.out, PID recorded in $STATE_DIR/NAME.pid.
launch() {
    local name=$1
    shift
    echo "=== $(date -Is) $*" >>"$LOG_DIR/$name.out"
    setsid "$@" </dev/null >>"$LOG_DIR/$name.out" 2>&1 &
    local pid=$! i
    echo "$pid" >"$STATE_DIR/$name.pid"
    STARTED=("$name" "${STARTED[@]}")
    # Until the exec chain (bash → setsid → [setpriv →] daemon) has reached the daemon, `alive` would say no.
    for ((i = 0; i < 100; i++)); do
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] && return 0
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.05
    done
}

# wait_for NAME SECONDS COMMAND...: until COMMAND succeeds, failing if the daemon dies or time runs out.
wait_for() {
    local name=$1 seconds=$2 i
    shift 2
    for ((i = 0; i < seconds * 4; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        alive "$name" || fail "$name" "$name exited during startup"
        sleep 0.25
    done
    fail "$name" "$name did not become ready within ${seconds}s ($*)"
}

start_munged() {
    alive munged && return 0
    if munge_works; then
        say "using the munged that is already running"
        return 0
    fi
    setup_munge
    # Files left by a munged that died (no munged answers on the socket, checked above).
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock /run/munge/munged.pid
    launch munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
    wait_for munged 15 munge_works
}

start_slurmctld() {
    alive slurmctld && return 0
    foreign slurmctld && die "a slurmctld not started by this script is running; stop it first"
    install -d -m 0755 "$HOME_DIR/slurmctld"
    # -i: ignore unreadable saved state rather than refusing to start.
    launch slurmctld slurmctld -D -i
    wait_for slurmctld 30 bash -c 'scontrol ping | grep -q "is UP"'
}

start_slurmd() {
    alive slurmd && return 0
    foreign slurmd && die "a slurmd not started by this script is running; stop it first"
    install -d -m 0755 "$HOME_DIR/slurmd"
    SLURMD_SINCE=$(date +%s)
    launch slurmd slurmd -D
}

SLURMD_SINCE=0   # when this run started slurmd: the node must have registered since

node_state() {
    local node info started
    node=$(hostname -s)
    # A restarted controller restores the node as idle before slurmd has registered: check its start time too.
    info=$(scontrol show node --oneliner "$node" 2>/dev/null) || return 0
    started=$(grep -o 'SlurmdStartTime=[^ ]*' <<<"$info" | cut -d= -f2)
    if [[ $started == None || -z $started ]] || (($(date -d "$started" +%s) < SLURMD_SINCE - 1)); then
        echo "unregistered"
        return 0
    fi
    sinfo -h -N -n "$node" -o %T 2>/dev/null | head -n 1
}

wait_idle() {
    local node state resumed=0 i d
    node=$(hostname -s)
    for ((i = 0; i < WAIT_S * 2; i++)); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated | completing) say "node $node is $state"; return 0 ;;
            drain*)  # drained or draining, e.g. "Kill task failed" in an earlier session: it is ours, resume it
                if ((!resumed)); then
                    say "node $node is $state ($(sinfo -h -N -n "$node" -o %E)); resuming it"
                    scontrol update nodename="$node" state=resume || true
                    resumed=1
                fi ;;
        esac
        for d in "${DAEMONS[@]}"; do
            if [[ -e $STATE_DIR/$d.pid ]] && ! alive "$d"; then
                fail "$d" "$d exited while waiting for the node"
            fi
        done
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    sinfo -R >&2 || true
    log_tail slurmctld
    fail slurmd "node $node not idle after ${WAIT_S}s (state: ${state:-none})"
}

start() {
    need_root start
    if alive munged && alive slurmctld && alive slurmd; then
        say "already running (munged $(pid_of munged), slurmctld $(pid_of slurmctld), slurmd $(pid_of slurmd))"
        wait_idle
        return 0
    fi
    install_packages
    mkdir -p "$STATE_DIR" "$LOG_DIR"
    write_config
    start_munged
    start_slurmctld
    start_slurmd
    wait_idle
    say "started; try: sbatch --wrap hostname && squeue; logs in $LOG_DIR"
}

stop_one() {
    local name=$1 pid i
    pid=$(pid_of "$name")
    if [[ -z $pid ]]; then
        return 0
    fi
    if alive "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        i=0
        while alive "$name" && ((i++ < 60)); do sleep 0.25; done
        if alive "$name"; then
            say "$name ($pid) ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
        [[ ${2:-} == quiet ]] || say "stopped $name ($pid)"
    fi
    rm -f "$STATE_DIR/$name.pid"
}

stop_daemons() {
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_one "${DAEMONS[i]}"; done
}

stop() {
    need_root stop
    if alive slurmctld; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null | wc -l || true)
        if ((jobs > 0)); then
            say "$jobs jobs remain queued or running; they resume on the next start (scancel them to drop them)"
        fi
    fi
    stop_daemons
    say "stopped"
}

status() {
    local d rc=0
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then
            echo "$d: running (pid $(pid_of "$d"))"
        else
            echo "$d: not running"
            rc=3
        fi
    done
    if ((rc == 0)); then
        sinfo || rc=3
    fi
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
