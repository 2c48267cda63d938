#!/usr/bin/env bash
# A real single-node SLURM (slurmctld + slurmd + munge) on localhost, for tests and demos.
#
#   deploy/slurm/local-cluster.sh start    install packages if missing, start munged/slurmctld/slurmd
#   deploy/slurm/local-cluster.sh stop     cancel jobs, stop only the daemons this script started
#   deploy/slurm/local-cluster.sh status   print daemons, sinfo and squeue; exit 0 if up, 3 if not
#
# Made for a root shell on a Debian 12 machine without systemd (CI containers); it never touches a
# daemon it did not start. It is idempotent: `start` on a running cluster and `stop` on a stopped
# one are no-ops. Facts behind the choices: ../../../shared/recipes/local-slurm.md (in the repo:
# see deploy/slurm/README.md, "A SLURM of your own").
#
# Exit codes: 0 ok; 1 failure; 2 usage; 3 not running (status);
#             10 not root; 11 packages missing and cannot be installed.
#
# Environment (all optional):
#   SLURM_LOCAL_CPUS     CPUs declared for the node (default: max(nproc, 4); more than the real
#                        count lets more 1-core jobs run at once, which the tests need)
#   SLURM_LOCAL_MEM_MB   RealMemory of the node (default: 90% of MemTotal)
#   SLURM_LOCAL_STATE    where this script keeps its PID records and lock (default /run/surveypipe-slurm)
#   SLURM_LOCAL_KEEP_STATE=1   keep job ids/state across restarts (default: slurmctld -c, clean)
set -euo pipefail

STATE_DIR=${SLURM_LOCAL_STATE:-/run/surveypipe-slurm}
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
MARKER="# written by surveypipe deploy/slurm/local-cluster.sh"
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { printf 'local-cluster: %s\n' "$*" >&2; }
die() { local code=$1; shift; log "ERROR: $*"; exit "$code"; }

# ---- process helpers: a PID is "ours and alive" if we recorded it, its command name matches, and
# it is not a zombie (killed daemons can linger as zombies where PID 1 reaps slowly).
pid_state() { # PID -> one-letter state from /proc, or empty if gone
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }          # strip "pid (comm) "
    printf '%s' "${stat%% *}"
}
pid_alive() { # PID COMM
    local pid=$1 comm=$2 state
    [[ -n "$pid" && "$pid" =~ ^[0-9]+$ ]] || return 1
    state=$(pid_state "$pid")
    [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]]
}
pid_gone() { local s; s=$(pid_state "$1"); [[ -z $s || $s == Z || $s == X ]]; }
recorded_pid() { cat "$STATE_DIR/$1.pid" 2>/dev/null || true; }
record_pid() { printf '%s\n' "$2" >"$STATE_DIR/$1.pid"; }
forget_pid() { rm -f "$STATE_DIR/$1.pid"; }
wait_until() { # TIMEOUT_S CMD... : poll every 0.2 s
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@"; do
        (( $(date +%s) < deadline )) || return 1
        sleep 0.2
    done
}
daemon_from_pidfile() { # PIDFILE COMM -> prints PID if alive
    local pid
    pid=$(cat "$1" 2>/dev/null || true)
    if pid_alive "$pid" "$2"; then printf '%s' "$pid"; fi
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die 10 "must run as root (starts munged/slurmctld/slurmd); you are $(id -un)"
}

ensure_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die 11 "packages missing (${missing[*]}) and no apt-get"
    log "installing ${missing[*]} (apt-get)"
    # Installing starts nothing here: service starts are blocked without systemd/policy-rc.d.
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$STATE_DIR/apt.log" 2>&1; then
        tail -n 20 "$STATE_DIR/apt.log" >&2 || true
        die 11 "apt-get could not install ${missing[*]} (no package registry?); log: $STATE_DIR/apt.log"
    fi
}

write_conf() {
    local cpus mem_mb
    cpus=${SLURM_LOCAL_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
    mem_mb=${SLURM_LOCAL_MEM_MB:-$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.90}' /proc/meminfo)}
    mkdir -p /etc/slurm
    local f backup
    for f in "$CONF" "$GRES_CONF"; do
        if [[ -f $f ]] && ! grep -qF "$MARKER" "$f"; then
            backup="$f.bak.$(date +%Y%m%d%H%M%S)"
            log "existing $f was not written by this script: moved to $backup"
            mv "$f" "$backup"
        fi
    done
    cat >"$CONF.tmp" <<EOF
$MARKER
# Single node on localhost. Safe to delete; rewritten at every start.
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without DefMemPerCPU a job without --mem takes the whole node's memory.
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# The 60 s defaults make --begin, arrays and dependencies slow.
SchedulerParameters=sched_interval=5,bf_interval=5
ScronParameters=enable
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# One pretend GPU (its device file is /dev/null): lets jobs asking for --gres=gpu:1 be scheduled,
# one at a time, so GPU job templates can be tested end to end on a machine without a GPU.
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    printf '%s\nNodeName=localhost Name=gpu File=/dev/null\n' "$MARKER" >"$GRES_CONF"
    log "wrote $CONF and $GRES_CONF (CPUs=$cpus RealMemory=${mem_mb}MB, 1 pretend GPU)"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        pid_alive "$(recorded_pid munged)" munged || log "munged already running (not ours): using it"
        return 0
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged 9>&-
    wait_until 10 munge_works || die 1 "munged did not start; see /var/log/munge/munged.log"
    local pid
    pid=$(daemon_from_pidfile /run/munge/munged.pid munged)
    [[ -n $pid ]] || die 1 "munged runs but /run/munge/munged.pid has no live PID"
    record_pid munged "$pid"
    log "munged started (pid $pid)"
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n1; }
node_usable() { [[ "$(node_state)" =~ ^(idle|mixed|allocated)$ ]]; }
ctld_answers() { scontrol ping 2>/dev/null | grep -q "UP"; }
slurmd_up() { [[ -n "$(daemon_from_pidfile "$RUN_DIR/slurmd.pid" slurmd)" ]]; }

start_slurm() {
    mkdir -p "$RUN_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
    local pid
    pid=$(daemon_from_pidfile "$RUN_DIR/slurmctld.pid" slurmctld)
    if [[ -z $pid ]]; then
        write_conf
        if [[ ${SLURM_LOCAL_KEEP_STATE:-0} == 1 ]]; then slurmctld 9>&-; else slurmctld -c 9>&-; fi
        wait_until 15 ctld_answers || { tail -n 20 "$LOG_DIR/slurmctld.log" >&2 || true; die 1 "slurmctld did not answer"; }
        pid=$(daemon_from_pidfile "$RUN_DIR/slurmctld.pid" slurmctld)
        [[ -n $pid ]] || die 1 "slurmctld answers but $RUN_DIR/slurmctld.pid has no live PID"
        record_pid slurmctld "$pid"
        log "slurmctld started (pid $pid)"
    elif [[ "$pid" != "$(recorded_pid slurmctld)" ]]; then
        log "slurmctld already running (pid $pid, not ours): using it"
    fi
    pid=$(daemon_from_pidfile "$RUN_DIR/slurmd.pid" slurmd)
    if [[ -z $pid ]]; then
        slurmd -N localhost 9>&-
        wait_until 10 slurmd_up || true
        pid=$(daemon_from_pidfile "$RUN_DIR/slurmd.pid" slurmd)
        [[ -n $pid ]] || { tail -n 20 "$LOG_DIR/slurmd.log" >&2 || true; die 1 "slurmd did not start"; }
        record_pid slurmd "$pid"
        log "slurmd started (pid $pid)"
    elif [[ "$pid" != "$(recorded_pid slurmd)" ]]; then
        log "slurmd already running (pid $pid, not ours): using it"
    fi
    if ! wait_until 30 node_usable; then
        # A drained/down node (e.g. after an unclean stop) is put back once.
        scontrol update nodename=localhost state=resume 2>/dev/null || true
        wait_until 15 node_usable || die 1 "node localhost is '$(node_state)', not idle; see $LOG_DIR/slurmd.log"
    fi
}

cmd_start() {
    require_root
    local t0=$SECONDS
    ensure_packages
    start_munge
    start_slurm
    log "ready in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D %T %c CPUs %m MB' | head -n1)"
}

stop_pid() { # NAME COMM : stop a daemon only if this script recorded it
    local name=$1 comm=$2 pid
    pid=$(recorded_pid "$name")
    if [[ -z $pid ]]; then return 0; fi
    if pid_alive "$pid" "$comm"; then
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_until 15 pid_gone "$pid"; then
            log "$name (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "$name stopped (pid $pid)"
    fi
    forget_pid "$name"
}

no_jobs() { [[ -z "$(squeue -h -o %i 2>/dev/null)" ]]; }

cmd_stop() {
    require_root
    local ours=0
    for n in slurmctld slurmd; do [[ -n "$(recorded_pid $n)" ]] && ours=1; done
    if ((ours)) && ctld_answers; then
        # Stopping slurmd does not stop running jobs: cancel them first and wait.
        if ! no_jobs; then
            log "cancelling jobs: $(squeue -h -o %i | tr '\n' ' ')"
            scancel --full $(squeue -h -o %i) 2>/dev/null || true
            wait_until 30 no_jobs || log "jobs still listed after 30 s: $(squeue -h -o '%i %T' | tr '\n' ' ')"
        fi
    fi
    stop_pid slurmd slurmd
    stop_pid slurmctld slurmctld
    stop_pid munged munged
    log "stopped"
}

cmd_status() {
    local up=1 n comm pid
    for n in munged slurmctld slurmd; do
        pid=$(recorded_pid "$n")
        if pid_alive "$pid" "$n"; then echo "$n: running (pid $pid, started by this script)"
        else
            case $n in
                munged) pid=$(daemon_from_pidfile /run/munge/munged.pid munged) ;;
                *) pid=$(daemon_from_pidfile "$RUN_DIR/$n.pid" "$n") ;;
            esac
            if [[ -n $pid ]]; then echo "$n: running (pid $pid, not started by this script)"
            else echo "$n: not running"; up=0; fi
        fi
    done
    if ((up)) && ctld_answers; then
        sinfo
        squeue
        node_usable && return 0
    fi
    return 3
}

main() {
    local cmd=${1:-}
    case $cmd in
        start|stop) ;;
        status) cmd_status; return ;;
        -h|--help|help) sed -n '2,20p' "$0"; return 0 ;;
        *) echo "usage: $0 start|stop|status" >&2; return 2 ;;
    esac
    require_root
    mkdir -p "$STATE_DIR"
    # One start/stop at a time (make test and a developer may race).
    exec 9>"$STATE_DIR/lock"
    flock -w 120 9 || die 1 "another local-cluster.sh holds $STATE_DIR/lock"
    "cmd_$cmd"
}

main "$@"
