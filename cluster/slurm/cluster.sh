#!/usr/bin/env bash
# A real Slurm cluster on loopback, on this one machine: munged, MariaDB (socket only),
# slurmdbd, slurmctld and NODES slurmd "nodes" n1..nN, each in its own UTS namespace.
# For development and CI; run as root. `cluster.sh help` says how to use it.
set -euo pipefail

usage() {
	cat <<EOF
usage: bash cluster/slurm/cluster.sh {install|start|stop|status|reset|help}

  install  apt-get install the Slurm, munge and MariaDB packages (skipped when installed)
  start    write the configs and start munged, MariaDB, slurmdbd, slurmctld and the nodes,
           then wait until every node is idle and sacct answers. A no-op when the
           cluster is already up and healthy; starts only what is missing otherwise.
  stop     stop the daemons by the PIDs in their pid files (in parallel). Slurm's state
           (queued and finished jobs, job ids) survives: 'start' brings it back.
  status   show each daemon and the nodes; exit 0 when healthy, 3 otherwise
  reset    cancel every job, stop, and delete all state: the next 'start' is a fresh cluster

Environment (read by start; the values of the last start are kept until 'reset'):
  NODES=2                  number of nodes n1..nN (1-16)
  CPUS_PER_NODE=4          CPUs each node declares (more than the cores: oversubscribed)
  MEM_PER_NODE_MB=4000     RealMemory of each node
  GPUS_PER_NODE=0          declare that many GPUs per node as GRES (bookkeeping only: no devices)
  TRAINYARD_SLURM_DIR      state, logs, pid files, MariaDB data (default $D_DEFAULT)
  START_TIMEOUT=60         seconds to wait for each daemon
  TRAINYARD_SLURM_FORCE=1  overwrite a /etc/slurm/*.conf that this script did not write

The Slurm config is $SLURM_CONF_FILE, where the client commands (sbatch, srun,
squeue, sacct, scontrol) look by default. A shell that has another SLURM_CONF set should
  export SLURM_CONF=$SLURM_CONF_FILE

Then: srun -N2 -n2 hostname   # n1, n2
      sbatch --wrap 'sleep 1' && sacct
Partitions: debug (default, all nodes) and low (all nodes, preemptible: requeued when a
debug job needs its CPUs). Account: $ACCOUNT (root's default account is root). MaxArraySize=$MAX_ARRAY_SIZE.
EOF
}

# ---------------------------------------------------------------- settings
D_DEFAULT=/var/lib/trainyard-slurm
D=${TRAINYARD_SLURM_DIR:-$D_DEFAULT}
D=${D%/}
NODES_DEFAULT=2
CPUS_DEFAULT=4
MEM_DEFAULT=4000
START_TIMEOUT=${START_TIMEOUT:-60}
CONF_DIR=/etc/slurm
SLURM_CONF_FILE=$CONF_DIR/slurm.conf
DBD_CONF_FILE=$CONF_DIR/slurmdbd.conf
GRES_CONF_FILE=$CONF_DIR/gres.conf
CLUSTER=trainyard
ACCOUNT=trainyard
CTLD_PORT=6817
DBD_PORT=6819
SLURMD_PORT_BASE=17000
MAX_ARRAY_SIZE=1001
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
# The client commands this script runs must read our config, whatever the caller's SLURM_CONF.
export SLURM_CONF=$SLURM_CONF_FILE
MARKER="# Written by trainyard cluster/slurm/cluster.sh"

RUN=$D/run
LOG=$D/log
STATE=$D/state
MYSQL_DATA=$D/mysql
MYSQL_SOCK=$RUN/mysqld/mysqld.sock
MYSQL_PID=$RUN/mysqld/mariadb.pid
MUNGE_PID=$RUN/munge/munged.pid
DBD_PID=$RUN/slurmdbd.pid
CTLD_PID=$RUN/slurmctld.pid
SETTINGS=$D/cluster.env
FAKE_GPU_DIR=$D/fakegpu

T0=${EPOCHREALTIME//[^0-9]/}

say() {
	local now=${EPOCHREALTIME//[^0-9]/}
	local cs=$(((now - T0) / 10000))
	printf '[slurm %3d.%02ds] %s\n' $((cs / 100)) $((cs % 100)) "$*"
}

die() {
	printf '[slurm] ERROR: %s\n' "$*" >&2
	exit 1
}

# die_log NAME MESSAGE: fail with the tail of NAME's log files.
die_log() {
	local name=$1 f
	shift
	printf '[slurm] ERROR: %s\n' "$*" >&2
	for f in "$LOG/$name.log" "$LOG/$name.out"; do
		[[ -s $f ]] || continue
		printf '[slurm] ---- last lines of %s ----\n' "$f" >&2
		tail -n 25 "$f" >&2
	done
	exit 1
}

need_root() { [[ $(id -u) == 0 ]] || die "run as root (it starts daemons and writes /etc/slurm and /etc/hosts)"; }

# The settings of the last start are kept in $SETTINGS; the environment overrides them.
load_settings() {
	local k v s_nodes="" s_cpus="" s_mem="" s_gpus=""
	if [[ -f $SETTINGS ]]; then
		while IFS='=' read -r k v; do
			case $k in
			NODES) s_nodes=$v ;;
			CPUS_PER_NODE) s_cpus=$v ;;
			MEM_PER_NODE_MB) s_mem=$v ;;
			GPUS_PER_NODE) s_gpus=$v ;;
			esac
		done <"$SETTINGS"
	fi
	NODES=${NODES:-${s_nodes:-$NODES_DEFAULT}}
	CPUS_PER_NODE=${CPUS_PER_NODE:-${s_cpus:-$CPUS_DEFAULT}}
	MEM_PER_NODE_MB=${MEM_PER_NODE_MB:-${s_mem:-$MEM_DEFAULT}}
	GPUS_PER_NODE=${GPUS_PER_NODE:-${s_gpus:-0}}
	[[ $NODES =~ ^[0-9]+$ ]] && ((NODES >= 1 && NODES <= 16)) || die "NODES must be 1-16, not '$NODES'"
	[[ $CPUS_PER_NODE =~ ^[0-9]+$ ]] && ((CPUS_PER_NODE >= 1)) || die "CPUS_PER_NODE must be a positive integer"
	[[ $MEM_PER_NODE_MB =~ ^[0-9]+$ ]] && ((MEM_PER_NODE_MB >= 100)) || die "MEM_PER_NODE_MB must be >= 100"
	[[ $GPUS_PER_NODE =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE must be an integer (0: no GPU GRES)"
	[[ $START_TIMEOUT =~ ^[0-9]+$ ]] || die "START_TIMEOUT must be an integer"
	NODE_NAMES=()
	local i
	for ((i = 1; i <= NODES; i++)); do NODE_NAMES+=("n$i"); done
	NODE_RANGE="n[1-$NODES]"
	((NODES == 1)) && NODE_RANGE=n1
	return 0
}

# ---------------------------------------------------------------- pids
# daemon_pid COMM PIDFILE: print the pid in PIDFILE when that process is alive and is COMM.
daemon_pid() {
	local comm=$1 file=$2 pid c
	[[ -s $file ]] || return 1
	read -r pid <"$file" || true
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	[[ -r /proc/$pid/comm ]] || return 1
	read -r c <"/proc/$pid/comm" || return 1
	[[ $c == "$comm" ]] || return 1
	echo "$pid"
}

slurmd_pidfile() { echo "$RUN/slurmd-$1.pid"; }

# stop_daemons LABEL COMM:PIDFILE...: SIGTERM them all at once, wait, SIGKILL what is left.
stop_daemons() {
	local label=$1 spec comm file pid names=() pids=() files=()
	shift
	for spec in "$@"; do
		comm=${spec%%:*}
		file=${spec#*:}
		if pid=$(daemon_pid "$comm" "$file"); then
			kill -TERM "$pid" 2>/dev/null || true
			pids+=("$pid")
			names+=("$(basename "$file" .pid)[$pid]")
		fi
		files+=("$file")
	done
	if ((${#pids[@]} == 0)); then
		rm -f "${files[@]}"
		return 0
	fi
	local deadline=$((${EPOCHREALTIME//[^0-9]/} + 20000000)) alive p
	while :; do
		alive=()
		for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
		((${#alive[@]} == 0)) && break
		if ((${EPOCHREALTIME//[^0-9]/} > deadline)); then
			say "$label: still alive after 20 s, SIGKILL ${alive[*]}"
			kill -KILL "${alive[@]}" 2>/dev/null || true
			sleep 0.5
			break
		fi
		sleep 0.1
	done
	rm -f "${files[@]}"
	say "stopped $label: ${names[*]}"
}

# wait_for SECONDS WHAT LOGNAME PID CHECK...: poll CHECK until it succeeds; fail with the log
# tail of LOGNAME when it times out or when PID (if not empty) dies.
wait_for() {
	local secs=$1 what=$2 logname=$3 pid=$4
	shift 4
	local deadline=$((${EPOCHREALTIME//[^0-9]/} + secs * 1000000))
	while ! "$@" >/dev/null 2>&1; do
		if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
			die_log "$logname" "$what: the daemon exited"
		fi
		if ((${EPOCHREALTIME//[^0-9]/} > deadline)); then
			die_log "$logname" "$what: not ready after ${secs} s"
		fi
		sleep 0.1
	done
}

# ---------------------------------------------------------------- checks
MUNGE_SOCKET=/run/munge/munge.socket.2
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
# munge_up: munge answers. The client retries for ~2 s when nothing listens, so look first:
# our munged alive, or something listening on the socket (a stale file after a crash is not).
munge_up() {
	if ! daemon_pid munged "$MUNGE_PID" >/dev/null; then
		awk -v s="$MUNGE_SOCKET" '$8 == s { found = 1 } END { exit !found }' /proc/net/unix 2>/dev/null || return 1
	fi
	munge_ok
}
mysql_ok() { mariadb --no-defaults -uroot --socket="$MYSQL_SOCK" -Nse 'SELECT 1' >/dev/null 2>&1; }
dbd_ok() { sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
sacct_ok() { sacct -n -X -S now-1minutes -o jobid >/dev/null 2>&1; }

# nodes_ready: every node of the config is known to slurmctld and usable (idle, mixed or
# allocated; not down, drained, unknown or not responding).
nodes_ready() {
	local out n st count=0
	out=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null) || return 1
	while read -r n st; do
		[[ -n $n ]] || continue
		case $st in
		idle | mix | alloc | comp) count=$((count + 1)) ;;
		*) return 1 ;;
		esac
	done <<<"$out"
	((count == NODES))
}

daemons_alive() {
	munge_up || return 1
	daemon_pid mariadbd "$MYSQL_PID" >/dev/null || return 1
	daemon_pid slurmdbd "$DBD_PID" >/dev/null || return 1
	daemon_pid slurmctld "$CTLD_PID" >/dev/null || return 1
	local n
	for n in "${NODE_NAMES[@]}"; do daemon_pid slurmd "$(slurmd_pidfile "$n")" >/dev/null || return 1; done
}

# ---------------------------------------------------------------- configs
render_slurm_conf() {
	local host=$1 i
	cat <<EOF
$MARKER -- rerun it instead of editing.
# State, logs and pid files: $D. Settings: NODES=$NODES CPUS_PER_NODE=$CPUS_PER_NODE MEM_PER_NODE_MB=$MEM_PER_NODE_MB
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again once its old credential expires (default 120 s; minimum 5).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# Nodes may declare more CPUs and memory than the machine has (oversubscription for tests).
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
# room for a 10,000-trial sweep beside the finished jobs kept for MinJobAge (cancelled
# array tasks count one record each); the default is 10000
MaxJobCount=100000
KillWait=5
WaitTime=0
# Submit to start in ~0.5 s instead of ~3 s.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
MaxArraySize=$MAX_ARRAY_SIZE
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageEnforce=associations,limits,qos
JobCompType=jobcomp/none
EOF
	local gres=""
	if ((GPUS_PER_NODE > 0)); then
		echo "# GPUS_PER_NODE=$GPUS_PER_NODE: GPUs that exist only in Slurm's books (no devices, no CUDA_VISIBLE_DEVICES)."
		echo "GresTypes=gpu"
		echo "AccountingStorageTRES=gres/gpu"
		gres=" Gres=gpu:$GPUS_PER_NODE"
	fi
	for ((i = 1; i <= NODES; i++)); do
		echo "NodeName=n$i NodeAddr=127.0.1.$i NodeHostname=n$i Port=$((SLURMD_PORT_BASE + i)) CPUs=$CPUS_PER_NODE RealMemory=$MEM_PER_NODE_MB$gres Features=loopback,cpu State=UNKNOWN"
	done
	cat <<EOF
PartitionName=debug Nodes=$NODE_RANGE Default=YES MaxTime=INFINITE State=UP PriorityTier=10
PartitionName=low Nodes=$NODE_RANGE MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
EOF
}

render_gres_conf() {
	echo "$MARKER -- rerun it instead of editing."
	if ((GPUS_PER_NODE > 0)); then
		# The gpu plugin counts device files: character devices that are /dev/null (1:3).
		local devs=$FAKE_GPU_DIR/gpu0
		((GPUS_PER_NODE == 1)) || devs="$FAKE_GPU_DIR/gpu[0-$((GPUS_PER_NODE - 1))]"
		echo "NodeName=$NODE_RANGE Name=gpu File=$devs"
	fi
}

render_dbd_conf() {
	local host=$1
	cat <<EOF
$MARKER -- rerun it instead of editing.
AuthType=auth/munge
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DBD_PID
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
}

# write_if_changed FILE CONTENT MODE: returns 0 when the file changed.
write_if_changed() {
	local file=$1 content=$2 mode=$3
	if [[ -f $file ]] && [[ "$(<"$file")" == "$content" ]]; then
		return 1
	fi
	if [[ -f $file ]] && ! head -n 1 "$file" | grep -qF "$MARKER" && [[ ${TRAINYARD_SLURM_FORCE:-0} != 1 ]]; then
		die "$file exists and was not written by this script; move it away or set TRAINYARD_SLURM_FORCE=1"
	fi
	mkdir -p "$(dirname "$file")"
	printf '%s\n' "$content" >"$file.tmp.$$"
	chmod "$mode" "$file.tmp.$$"
	mv -f "$file.tmp.$$" "$file"
	say "wrote $file"
	return 0
}

# Add "127.0.1.i ni" to /etc/hosts for each node, in place (never rewriting other lines).
ensure_hosts() {
	local i ip name added=() got
	for ((i = 1; i <= NODES; i++)); do
		ip=127.0.1.$i
		name=n$i
		if ! awk -v ip="$ip" -v name="$name" '
			$1 == ip { for (f = 2; f <= NF; f++) { if ($f ~ /^#/) break; if ($f == name) found = 1 } }
			END { exit !found }' /etc/hosts; then
			printf '%s %s\n' "$ip" "$name" >>/etc/hosts
			added+=("$name")
		fi
		got=$(getent hosts "$name" | awk '{print $1; exit}') || true
		[[ $got == "$ip" ]] || die "/etc/hosts: $name resolves to '${got:-nothing}', not $ip (another line names $name?)"
	done
	if ((${#added[@]})); then say "/etc/hosts: added ${added[*]}"; fi
	return 0
}

# GPUS_PER_NODE > 0: character devices that are /dev/null, for the gpu GRES plugin to count.
ensure_fake_gpus() {
	local k
	((GPUS_PER_NODE > 0)) || return 0
	install -d -m 0755 "$FAKE_GPU_DIR"
	for ((k = 0; k < GPUS_PER_NODE; k++)); do
		[[ -c $FAKE_GPU_DIR/gpu$k ]] || mknod -m 0666 "$FAKE_GPU_DIR/gpu$k" c 1 3
	done
}

# ---------------------------------------------------------------- daemons
start_munge() {
	if munge_up; then
		if daemon_pid munged "$MUNGE_PID" >/dev/null; then
			say "munged already running (pid $(<"$MUNGE_PID"))"
		else
			say "munged already running (not started by this script: left alone)"
		fi
		return 0
	fi
	if [[ ! -s /etc/munge/munge.key ]]; then
		mungekey --create --keyfile=/etc/munge/munge.key >/dev/null
		chown munge:munge /etc/munge/munge.key
		chmod 0400 /etc/munge/munge.key
		say "created /etc/munge/munge.key"
	fi
	install -d -o munge -g munge -m 0755 /run/munge "$RUN/munge"
	touch "$LOG/munged.log"
	chown munge:munge "$LOG/munged.log"
	chmod 0640 "$LOG/munged.log"
	rm -f "$MUNGE_PID"
	runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" --log-file="$LOG/munged.log" \
		--seed-file="$RUN/munge/munged.seed" </dev/null >>"$LOG/munged.out" 2>&1 9>&- ||
		die_log munged "munged did not start"
	wait_for "$START_TIMEOUT" munged munged "" munge_ok
	say "munged started (pid $(<"$MUNGE_PID"))"
}

start_mariadb() {
	local pid
	if pid=$(daemon_pid mariadbd "$MYSQL_PID") && mysql_ok; then
		say "MariaDB already running (pid $pid)"
		return 0
	fi
	[[ -z ${pid:-} ]] || die_log mariadb "MariaDB (pid $pid) runs but does not answer on $MYSQL_SOCK; run stop"
	install -d -o mysql -g mysql -m 0755 "$RUN/mysqld"
	touch "$LOG/mariadb.log"
	chown mysql:mysql "$LOG/mariadb.log"
	if [[ ! -d $MYSQL_DATA/mysql ]]; then
		rm -rf "$MYSQL_DATA"
		install -d -o mysql -g mysql -m 0750 "$MYSQL_DATA"
		mariadb-install-db --no-defaults --user=mysql --datadir="$MYSQL_DATA" \
			--auth-root-authentication-method=socket --skip-test-db \
			</dev/null >"$LOG/mariadb-install.out" 2>&1 9>&- ||
			die_log mariadb-install "mariadb-install-db failed"
		say "MariaDB datadir initialised ($MYSQL_DATA)"
	fi
	rm -f "$MYSQL_PID"
	setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$MYSQL_DATA" \
		--socket="$MYSQL_SOCK" --pid-file="$MYSQL_PID" --skip-networking \
		--log-error="$LOG/mariadb.log" --skip-log-bin --skip-name-resolve \
		--innodb-buffer-pool-size=128M --innodb-log-file-size=64M \
		--innodb-flush-log-at-trx-commit=2 --innodb-lock-wait-timeout=900 \
		--innodb-use-native-aio=0 \
		</dev/null >>"$LOG/mariadb.out" 2>&1 9>&- &
	pid=$!
	wait_for "$START_TIMEOUT" MariaDB mariadb "$pid" mysql_ok
	say "MariaDB started, socket only (pid $(<"$MYSQL_PID"), $MYSQL_SOCK)"
}

start_slurmdbd() {
	local pid
	if pid=$(daemon_pid slurmdbd "$DBD_PID") && dbd_ok; then
		say "slurmdbd already running (pid $pid)"
		return 0
	fi
	[[ -z ${pid:-} ]] || die_log slurmdbd "slurmdbd (pid $pid) runs but sacctmgr gets no answer; run stop"
	rm -f "$DBD_PID"
	# The MariaDB client library reads the socket path from MYSQL_UNIX_PORT.
	MYSQL_UNIX_PORT=$MYSQL_SOCK /usr/sbin/slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1 9>&- ||
		die_log slurmdbd "slurmdbd did not start"
	wait_for "$START_TIMEOUT" slurmdbd slurmdbd "" dbd_ok
	say "slurmdbd started (pid $(<"$DBD_PID"))"
}

# Register the cluster, the account and root in it, once (sacctmgr is idempotent only in effect).
ensure_accounting() {
	if [[ -n $(sacctmgr -n -P list assoc cluster="$CLUSTER" account="$ACCOUNT" user=root format=user 2>/dev/null) ]]; then
		return 0
	fi
	if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster 2>/dev/null) ]]; then
		sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
	fi
	if [[ -z $(sacctmgr -n -P list account "$ACCOUNT" format=account 2>/dev/null) ]]; then
		sacctmgr -i -Q add account "$ACCOUNT" cluster="$CLUSTER" description="trainyard loopback" \
			organization=trainyard >/dev/null || die "sacctmgr add account $ACCOUNT failed"
	fi
	sacctmgr -i -Q add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null ||
		die "sacctmgr add user root account=$ACCOUNT failed"
	say "accounting: cluster $CLUSTER, account $ACCOUNT (user root; root's default account stays root), QOS normal"
}

start_slurmctld() {
	local pid
	if pid=$(daemon_pid slurmctld "$CTLD_PID"); then
		say "slurmctld already running (pid $pid)"
		return 0
	fi
	rm -f "$CTLD_PID"
	/usr/sbin/slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1 9>&- ||
		die_log slurmctld "slurmctld did not start"
	say "slurmctld launched"
}

start_slurmds() {
	local n i pid launched=() running=() bg=()
	for ((i = 1; i <= NODES; i++)); do
		n=n$i
		if pid=$(daemon_pid slurmd "$(slurmd_pidfile "$n")"); then
			running+=("${n}[$pid]")
			continue
		fi
		rm -f "$(slurmd_pidfile "$n")"
		mkdir -p "$STATE/slurmd/$n"
		# Its own UTS namespace: `hostname` in the node's jobs prints n$i.
		unshare --uts -- /bin/sh -c "hostname $n && exec /usr/sbin/slurmd -N $n" \
			</dev/null >>"$LOG/slurmd-$n.out" 2>&1 9>&- &
		bg+=($!)
		launched+=("$n")
	done
	# Only the launchers (each slurmd daemonises); not MariaDB, which is a child of this shell too.
	((${#bg[@]} == 0)) || wait "${bg[@]}" || true
	((${#running[@]} == 0)) || say "slurmd already running: ${running[*]}"
	((${#launched[@]} == 0)) || say "slurmd launched: ${launched[*]} (each under unshare --uts)"
}

wait_ctld() {
	local deadline=$((${EPOCHREALTIME//[^0-9]/} + START_TIMEOUT * 1000000)) pid
	while ! ctld_ok; do
		# slurmctld writes its pid file after daemonising; it may die before or after.
		if ! pid=$(daemon_pid slurmctld "$CTLD_PID") && [[ -s $CTLD_PID ]]; then
			die_log slurmctld "slurmctld exited"
		fi
		if ((${EPOCHREALTIME//[^0-9]/} > deadline)); then
			die_log slurmctld "slurmctld not answering after $START_TIMEOUT s"
		fi
		sleep 0.1
	done
	say "slurmctld up (pid $(<"$CTLD_PID"), $(hostname -s):$CTLD_PORT)"
}

wait_nodes() {
	local deadline=$((${EPOCHREALTIME//[^0-9]/} + START_TIMEOUT * 1000000)) n resumed=0 bad
	while ! nodes_ready; do
		for n in "${NODE_NAMES[@]}"; do
			[[ -s $(slurmd_pidfile "$n") ]] || continue
			daemon_pid slurmd "$(slurmd_pidfile "$n")" >/dev/null || die_log "slurmd-$n" "slurmd $n exited"
		done
		# A node left drained or down by an earlier run (e.g. "Kill task failed") comes back.
		if ((!resumed)); then
			bad=$(sinfo -h -N -p debug -t drain,drng,down,fail -o '%N' 2>/dev/null | sort -u | paste -sd, -) || true
			if [[ -n $bad ]]; then
				scontrol update nodename="$bad" state=resume >/dev/null 2>&1 || true
				say "resumed nodes left drained/down: $bad"
				resumed=1
			fi
		fi
		if ((${EPOCHREALTIME//[^0-9]/} > deadline)); then
			sinfo -N -p debug -o '%N %T %E' >&2 || true
			for n in "${NODE_NAMES[@]}"; do
				nodes_one_ok "$n" || die_log "slurmd-$n" "node $n not idle after $START_TIMEOUT s"
			done
			die_log slurmctld "nodes not idle after $START_TIMEOUT s"
		fi
		sleep 0.1
	done
}

nodes_one_ok() {
	local st
	st=$(sinfo -h -N -n "$1" -p debug -o '%t' 2>/dev/null) || return 1
	[[ $st == idle || $st == mix || $st == alloc || $st == comp ]]
}

# ---------------------------------------------------------------- commands
cmd_install() {
	local p missing=()
	for p in "${PACKAGES[@]}"; do
		[[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
	done
	if ((${#missing[@]} == 0)); then
		say "packages already installed: ${PACKAGES[*]} ($(dpkg-query -W -f='${Version}' slurmctld))"
		return 0
	fi
	need_root
	say "apt-get update"
	apt-get update -qq >/dev/null || die "apt-get update failed"
	say "apt-get install --no-install-recommends ${PACKAGES[*]} (missing: ${missing[*]})"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
		>/tmp/trainyard-slurm-apt.log 2>&1 || {
		tail -n 25 /tmp/trainyard-slurm-apt.log >&2
		die "apt-get install failed (log: /tmp/trainyard-slurm-apt.log)"
	}
	say "installed Slurm $(dpkg-query -W -f='${Version}' slurmctld), munge, MariaDB"
}

lock() {
	mkdir -p "$(dirname "$D")"
	exec 9>"$D.lock"
	flock 9
}

cmd_start() {
	need_root
	command -v slurmctld >/dev/null && command -v mariadbd >/dev/null && command -v munged >/dev/null ||
		die "Slurm is not installed: run 'bash $0 install' first"
	lock
	load_settings
	local host conf dbdconf gresconf changed_conf=0 changed_dbd=0
	host=$(hostname -s)
	conf=$(render_slurm_conf "$host")
	dbdconf=$(render_dbd_conf "$host")
	gresconf=$(render_gres_conf)
	if [[ -f $SLURM_CONF_FILE && "$(<"$SLURM_CONF_FILE")" == "$conf" &&
		-f $GRES_CONF_FILE && "$(<"$GRES_CONF_FILE")" == "$gresconf" &&
		-f $DBD_CONF_FILE && "$(<"$DBD_CONF_FILE")" == "$dbdconf" ]] &&
		daemons_alive && nodes_ready && sacct_ok; then
		say "already up and healthy: $NODES nodes ($NODE_RANGE) idle or busy, accounting on; nothing to do"
		return 0
	fi
	local gpus=""
	((GPUS_PER_NODE == 0)) || gpus=", $GPUS_PER_NODE GPUs (GRES only)"
	say "starting cluster '$CLUSTER': $NODES nodes x $CPUS_PER_NODE CPUs, ${MEM_PER_NODE_MB} MB$gpus; state in $D"
	install -d -m 0755 "$D" "$RUN" "$LOG" "$STATE" "$STATE/slurmctld" "$STATE/slurmd"
	touch "$D/.trainyard-slurm"
	write_if_changed "$SLURM_CONF_FILE" "$conf" 0644 && changed_conf=1
	write_if_changed "$GRES_CONF_FILE" "$gresconf" 0644 && changed_conf=1
	write_if_changed "$DBD_CONF_FILE" "$dbdconf" 0600 && changed_dbd=1
	printf 'NODES=%s\nCPUS_PER_NODE=%s\nMEM_PER_NODE_MB=%s\nGPUS_PER_NODE=%s\n' \
		"$NODES" "$CPUS_PER_NODE" "$MEM_PER_NODE_MB" "$GPUS_PER_NODE" >"$SETTINGS"
	ensure_hosts
	ensure_fake_gpus
	# A changed config needs the daemons that read it restarted (node changes need slurmctld).
	if ((changed_dbd)); then
		stop_daemons "slurmdbd (config changed)" "slurmdbd:$DBD_PID"
	fi
	if ((changed_conf)); then
		local specs=("slurmctld:$CTLD_PID") f
		for f in "$RUN"/slurmd-*.pid; do [[ -e $f ]] && specs+=("slurmd:$f"); done
		stop_daemons "slurmctld and slurmd (config changed)" "${specs[@]}"
	fi
	start_munge
	start_mariadb
	start_slurmdbd
	ensure_accounting
	start_slurmctld
	start_slurmds
	wait_ctld
	wait_nodes
	say "nodes up: $(sinfo -h -N -p debug -o '%N=%T' | paste -sd' ' -)"
	wait_for "$START_TIMEOUT" "sacct" slurmdbd "" sacct_ok
	say "ready: sacct works; partitions debug (default) and low (preemptible); MaxArraySize=$MAX_ARRAY_SIZE (array indices 0-$((MAX_ARRAY_SIZE - 1)))"
}

cmd_stop() {
	need_root
	lock
	local specs=("slurmctld:$CTLD_PID" "slurmdbd:$DBD_PID") f
	for f in "$RUN"/slurmd-*.pid; do [[ -e $f ]] && specs+=("slurmd:$f"); done
	stop_daemons "slurm daemons" "${specs[@]}"
	stop_daemons "MariaDB and munged" "mariadbd:$MYSQL_PID" "munged:$MUNGE_PID"
	say "stopped (state kept in $D)"
}

# Processes that listen on a unix socket under the slurmd spool dirs: the job step daemons
# (slurmstepd) of jobs still running, and everything below them.
leftover_step_pids() {
	local spool=$STATE/slurmd inodes pids=() p fd link
	[[ -d $spool ]] || return 0
	inodes=$(awk -v d="$spool/" 'index($8, d) == 1 { print $7 }' /proc/net/unix 2>/dev/null | sort -u)
	[[ -n $inodes ]] || return 0
	for p in /proc/[0-9]*; do
		for fd in "$p"/fd/*; do
			link=$(readlink "$fd" 2>/dev/null) || continue
			[[ $link == socket:\[*\] ]] || continue
			link=${link#socket:[}
			link=${link%]}
			if grep -qx "$link" <<<"$inodes"; then
				pids+=("${p#/proc/}")
				break
			fi
		done
	done
	((${#pids[@]})) || return 0
	# Add their descendants.
	local all=" ${pids[*]} " grew=1 pid ppid rest
	while ((grew)); do
		grew=0
		for p in /proc/[0-9]*/stat; do
			read -r pid _ rest <"$p" 2>/dev/null || continue
			rest=${rest##*) }
			ppid=$(awk '{print $2}' <<<"$rest")
			if [[ $all == *" $ppid "* && $all != *" $pid "* ]]; then
				all+="$pid "
				grew=1
			fi
		done
	done
	echo "$all"
}

cmd_reset() {
	need_root
	load_settings
	if ctld_ok; then
		local ids
		ids=$(squeue -h -o '%A' 2>/dev/null | paste -sd' ' -) || true
		if [[ -n $ids ]]; then
			# shellcheck disable=SC2086
			scancel $ids 2>/dev/null || true
			say "cancelled jobs: $ids"
			local deadline=$((${EPOCHREALTIME//[^0-9]/} + 20000000))
			while [[ -n $(squeue -h -o '%A' 2>/dev/null) ]] && ((${EPOCHREALTIME//[^0-9]/} < deadline)); do
				sleep 0.2
			done
		fi
	fi
	cmd_stop
	local left
	left=$(leftover_step_pids)
	if [[ -n ${left// /} ]]; then
		# shellcheck disable=SC2086
		kill -KILL $left 2>/dev/null || true
		say "killed leftover job step processes: $left"
	fi
	if [[ -d $D ]]; then
		[[ -e $D/.trainyard-slurm || -z $(ls -A "$D") ]] || die "$D has no .trainyard-slurm marker: not deleting it"
		[[ $D == /* && $D != / ]] || die "refusing to delete '$D'"
		rm -rf "$D"
	fi
	rm -f "$D.lock"
	local f
	for f in "$SLURM_CONF_FILE" "$DBD_CONF_FILE" "$GRES_CONF_FILE"; do
		[[ -f $f ]] && head -n 1 "$f" | grep -qF "$MARKER" && rm -f "$f"
	done
	say "reset: deleted $D and the configs; the next start is a fresh cluster (job ids from 1)"
}

cmd_status() {
	load_settings
	local healthy=1 pid n
	show() { # NAME COMM PIDFILE
		if pid=$(daemon_pid "$2" "$3"); then
			printf '  %-10s running (pid %s)\n' "$1" "$pid"
		else
			printf '  %-10s stopped\n' "$1"
			healthy=0
		fi
	}
	echo "cluster '$CLUSTER' (state in $D, config $SLURM_CONF_FILE)"
	if munge_up; then
		if pid=$(daemon_pid munged "$MUNGE_PID"); then
			printf '  %-10s running (pid %s)\n' munged "$pid"
		else printf '  %-10s running (not started by this script)\n' munged; fi
	else
		printf '  %-10s stopped\n' munged
		healthy=0
	fi
	show mariadb mariadbd "$MYSQL_PID"
	show slurmdbd slurmdbd "$DBD_PID"
	show slurmctld slurmctld "$CTLD_PID"
	for n in "${NODE_NAMES[@]}"; do show "slurmd $n" slurmd "$(slurmd_pidfile "$n")"; done
	if daemon_pid slurmctld "$CTLD_PID" >/dev/null && ctld_ok; then
		sinfo -o '  %10P %5a %6D %10T %N' || true
		printf '  jobs in queue: %s\n' "$(squeue -h 2>/dev/null | wc -l)"
		nodes_ready || healthy=0
	else
		healthy=0
	fi
	if ((healthy)) && sacct_ok; then
		echo "healthy"
		return 0
	fi
	echo "not healthy (run: bash $0 start)"
	return 3
}

main() {
	local cmd=${1:-help}
	case $cmd in
	install) cmd_install ;;
	start) cmd_start ;;
	stop) cmd_stop ;;
	status) cmd_status ;;
	reset) cmd_reset ;;
	help | -h | --help) usage ;;
	*)
		usage >&2
		exit 2
		;;
	esac
}

main "$@"
