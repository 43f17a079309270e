#!/usr/bin/env bash
# A throwaway single-machine SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) for tests
# and for trying the `slurm` launchers without a real cluster. Needs root and Debian/Ubuntu apt.
#
#   slurm/local_cluster.sh start    # install packages if missing, (re)start, wait for a probe job
#   slurm/local_cluster.sh status   # exit 0 when the cluster answers and runs jobs
#   slurm/local_cluster.sh stop     # stop every daemon by its pid file
#   eval "$(slurm/local_cluster.sh start)"   # `start` prints only `export SLURM_CONF=...` on stdout
#
# Environment (all optional):
#   SLURM_SANDBOX        everything lives here, wiped at each fresh start (default ${TMPDIR:-/tmp}/hypermixer-slurm)
#   LOCAL_SLURM_CPUS     CPUs the node declares (default 8; more than the machine has is fine)
#   LOCAL_SLURM_MEM_MB   memory the node declares (default: the larger of the machine's and 64 GiB)
#   LOCAL_SLURM_PORTS    "slurmctld slurmd slurmdbd mariadb" ports (default "6817 6818 6819 3307")
#   LOCAL_SLURM_NO_INSTALL=1   fail instead of running apt-get when packages are missing
set -euo pipefail

SANDBOX=${SLURM_SANDBOX:-${TMPDIR:-/tmp}/hypermixer-slurm}
MARK="$SANDBOX/.hypermixer-slurm-sandbox"      # only folders carrying this mark are ever wiped
CONF="$SANDBOX/etc/slurm.conf"
read -r CTLD_PORT SLURMD_PORT DBD_PORT SQL_PORT <<<"${LOCAL_SLURM_PORTS:-6817 6818 6819 3307}"
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
BINARIES=(slurmctld slurmd slurmdbd sbatch sacct sacctmgr munged mariadbd mariadb-install-db)

log() { echo "local_cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

alive() { local f="$SANDBOX/run/$1.pid"; [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }

# Client commands hang when slurmctld is down: always bound them.
client() { SLURM_CONF="$CONF" timeout "${CLIENT_TIMEOUT:-10}" "$@"; }

healthy() {  # daemons alive and the controller answers with a usable node
  alive slurmctld && alive slurmd && alive slurmdbd && alive mariadbd && alive munged || return 1
  client sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

install_packages() {
  local missing=() b
  for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null || missing+=("$b"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "${LOCAL_SLURM_NO_INSTALL:-0}" = 1 ] && die "missing ${missing[*]} and LOCAL_SLURM_NO_INSTALL=1"
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; installing them needs root (apt-get install ${PACKAGES[*]})"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install ${PACKAGES[*]}"
  log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  local t0=$SECONDS own_policy=0
  # Keep the packages' init scripts from starting system-wide daemons (we start our own copies).
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
  fi
  local rc=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PACKAGES[@]}"
  } >"${TMPDIR:-/tmp}/hypermixer-slurm-apt.log" 2>&1 || rc=$?
  [ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  if [ $rc -ne 0 ]; then
    tail -n 15 "${TMPDIR:-/tmp}/hypermixer-slurm-apt.log" >&2
    die "apt-get install failed (rc=$rc); full log: ${TMPDIR:-/tmp}/hypermixer-slurm-apt.log"
  fi
  log "packages installed in $((SECONDS - t0))s"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop_daemons() {  # stop NAME... : SIGTERM all, wait up to 20 s, then SIGKILL what is left
  local pids=() n f p i alive_any
  for n in "$@"; do
    f="$SANDBOX/run/$n.pid"
    [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && pids+=("$(cat "$f")")
    rm -f "$f"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for i in $(seq 1 80); do
    alive_any=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive_any=1; done
    [ $alive_any = 0 ] && return 0
    sleep 0.25
  done
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && { log "SIGKILL $p"; kill -9 "$p" 2>/dev/null || true; }; done
  return 0  # the last `kill -0` of a dead pid must not fail the stop under set -e
}

cmd_stop() {
  [ -d "$SANDBOX/run" ] || { log "nothing to stop in $SANDBOX"; return 0; }
  local t0=$SECONDS
  # cancel jobs first so slurmd does not leave job processes behind
  alive slurmctld && { client scancel --user="$(id -un)" >/dev/null 2>&1 || true; }
  # all at once: each takes ~2 s to exit, and nothing here needs an orderly accounting shutdown
  stop_daemons slurmd slurmctld slurmdbd mariadbd munged
  log "stopped in $((SECONDS - t0))s (logs kept in $SANDBOX/log)"
}

cmd_status() {
  local n
  for n in munged mariadbd slurmdbd slurmctld slurmd; do
    if alive "$n"; then echo "$n: running (pid $(cat "$SANDBOX/run/$n.pid"))"; else echo "$n: stopped"; fi
  done
  if healthy; then
    client sinfo -h -o 'node %N: %T, %c CPUs, %m MB' || true
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  echo "cluster not running (sandbox $SANDBOX)"
  return 1
}

write_configs() {
  local host=$1 cpus=$2 mem_mb=$3 dbpass=$4
  cat > "$SANDBOX/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$SANDBOX/munge/munge.sock,cred_expire=10
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$SANDBOX/log/slurmdbd.log
PidFile=$SANDBOX/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$SQL_PORT
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$SANDBOX/etc/slurmdbd.conf"
  # Why these settings:
  #  - SchedulerParameters: schedule at once (the defaults add ~3 s per job).
  #  - cred_expire=10: a requeued job may start again after 10 s instead of 30-60 s.
  #  - AccountingStoragePass: slurmctld's link to slurmdbd ignores AuthInfo, so name the socket here.
  #  - SlurmdParameters=config_overrides: the node may declare more CPUs/memory than the machine has,
  #    so multi-task jobs and arrays schedule on a 2-core machine.
  #  - CR_Core (memory not consumable) + no accounting gather: --mem only has to fit RealMemory.
  cat > "$CONF" <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SANDBOX/munge/munge.sock,cred_expire=10
StateSaveLocation=$SANDBOX/state
SlurmdSpoolDir=$SANDBOX/spool
SlurmctldPidFile=$SANDBOX/run/slurmctld.pid
SlurmdPidFile=$SANDBOX/run/slurmd.pid
SlurmctldLogFile=$SANDBOX/log/slurmctld.log
SlurmdLogFile=$SANDBOX/log/slurmd.log
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1
MpiDefault=none
MailProg=/bin/true
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$SANDBOX/munge/munge.sock
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND... : poll every 0.2 s
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "$what did not happen within ${limit}s; last log lines:"
      tail -n 8 "$SANDBOX"/log/*.log >&2 2>/dev/null || true
      die "$what timed out"
    fi
    sleep 0.2
  done
}

probe_completed() { [ "$(client squeue -h -t all -j "$1" -o %T 2>/dev/null)" = COMPLETED ]; }

cmd_start() {
  [ "$(id -u)" = 0 ] || die "needs root (it runs slurmd/slurmctld as root and may apt-get install)"
  if healthy; then
    log "already running in $SANDBOX (reusing it)"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  install_packages
  ls "$SANDBOX"/run/*.pid >/dev/null 2>&1 && cmd_stop   # half-running leftovers from an earlier start
  local p
  for p in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$SQL_PORT"; do
    port_busy "$p" && die "port $p on 127.0.0.1 is in use (another slurm/MariaDB?); set LOCAL_SLURM_PORTS"
  done
  local t0=$SECONDS
  # A fresh sandbox each time: job ids, accounting DB and controller state must not carry over.
  if [ -e "$SANDBOX" ]; then
    [ -e "$MARK" ] || [ -z "$(ls -A "$SANDBOX")" ] || die "refusing to wipe $SANDBOX (not a sandbox made by this script)"
    rm -rf "$SANDBOX"
  fi
  mkdir -p "$SANDBOX"/{etc,state,spool,log,munge,run,mysql}
  touch "$MARK"
  chmod 711 "$SANDBOX/munge"
  local host; host=$(hostname -s)
  getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts
  local cpus=${LOCAL_SLURM_CPUS:-8}
  local mem_mb=${LOCAL_SLURM_MEM_MB:-$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))}
  [ -n "${LOCAL_SLURM_MEM_MB:-}" ] || [ "$mem_mb" -ge 65536 ] || mem_mb=65536
  local dbpass; dbpass=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
  write_configs "$host" "$cpus" "$mem_mb" "$dbpass"
  export SLURM_CONF="$CONF"

  # munge with a private key and socket: nothing under /etc/munge or /run/munge is touched
  dd if=/dev/urandom of="$SANDBOX/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$SANDBOX/munge/munge.key"
  munged --force --key-file="$SANDBOX/munge/munge.key" --socket="$SANDBOX/munge/munge.sock" \
    --pid-file="$SANDBOX/run/munged.pid" --log-file="$SANDBOX/log/munged.log" \
    --seed-file="$SANDBOX/munge/munged.seed" 9>&-

  # MariaDB for accounting: without it sacct fails and submitit never sees CANCELLED jobs end
  mariadb-install-db --no-defaults --user=root --datadir="$SANDBOX/mysql/data" --skip-test-db \
    --auth-root-authentication-method=socket > "$SANDBOX/log/mariadb-install.log" 2>&1 \
    || { tail -n 10 "$SANDBOX/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  nohup mariadbd --no-defaults --user=root --datadir="$SANDBOX/mysql/data" \
    --socket="$SANDBOX/mysql/mysqld.sock" --pid-file="$SANDBOX/run/mariadbd.pid" \
    --bind-address=127.0.0.1 --port="$SQL_PORT" --log-error="$SANDBOX/log/mariadbd.log" \
    --innodb-buffer-pool-size=128M --skip-name-resolve >/dev/null 2>&1 9>&- &
  local sql=(mariadb --no-defaults -S "$SANDBOX/mysql/mysqld.sock" -uroot)
  wait_for 30 "MariaDB start" "${sql[@]}" -e 'select 1'
  "${sql[@]}" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$dbpass';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"

  slurmdbd 9>&-                              # reads slurmdbd.conf next to $SLURM_CONF; daemonizes
  wait_for 30 "slurmdbd start" client sacctmgr -n list cluster
  client sacctmgr -i add cluster local >/dev/null
  slurmctld -c 9>&-                          # -c: ignore any saved state; daemonizes
  slurmd 9>&-
  wait_for 60 "node up" healthy
  # Ready means a batch job really runs end to end (the scheduler loop starts a few s after slurmctld).
  local jid
  jid=$(client sbatch --parsable -o /dev/null -J ready-probe --wrap true) || die "probe sbatch failed"
  wait_for 60 "probe job $jid" probe_completed "$jid"
  log "cluster up in $((SECONDS - t0))s: $cpus CPUs, ${mem_mb} MB declared, sandbox $SANDBOX"
  echo "export SLURM_CONF=$CONF"
}

# Serialize start/stop between concurrent callers (two test sessions on one machine). The daemons
# are started with fd 9 closed (9>&-), else they would hold the lock for as long as they run.
LOCK="${SANDBOX%/}.lock"
case "${1:-}" in
  start) exec 9>"$LOCK"; flock -w 300 9 || die "timed out waiting for $LOCK"; cmd_start ;;
  stop) exec 9>"$LOCK"; flock -w 300 9 || die "timed out waiting for $LOCK"; cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
