#!/usr/bin/env bash
# Checks a running loopback cluster (cluster.sh start) end to end and prints the latencies.
# usage: bash cluster/slurm/smoke.sh        (SMOKE_PREEMPT=0 skips the ~15 s preemption check)
# Ends with "N passed, N failed"; exits non-zero when a check failed.
set -uo pipefail

PASS=0
FAIL=0
# Job output goes to a scratch directory that every "node" can write (they all share this
# machine's /tmp); the EXIT trap below removes it.
TMP=$(mktemp -d /tmp/trainyard-slurm-smoke.XXXXXX)
chmod 0755 "$TMP"
JOBS=()
cleanup() {
	((${#JOBS[@]} == 0)) || scancel "${JOBS[@]}" 2>/dev/null
	rm -rf "$TMP"
}
trap cleanup EXIT

ok() {
	PASS=$((PASS + 1))
	printf 'ok    %s\n' "$*"
}
bad() {
	FAIL=$((FAIL + 1))
	printf 'FAIL  %s\n' "$*"
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# state JOBID: the accounting state of the job (for an array: of every task, one per line).
state() { sacct -n -X -P -j "$1" -o state 2>/dev/null | awk '{print $1}' | sort -u; }
# wait_state JOBID STATE SECONDS
wait_state() {
	local end=$((SECONDS + $3))
	while ((SECONDS < end)); do
		[[ $(state "$1") == "$2" ]] && return 0
		sleep 0.2
	done
	return 1
}
# wait_file FILE LINES SECONDS
wait_file() {
	local end=$((SECONDS + $3))
	while ((SECONDS < end)); do
		[[ -f $1 ]] && (($(wc -l <"$1") >= $2)) && return 0
		sleep 0.05
	done
	return 1
}

sbatch_id() { sbatch --parsable "$@" | cut -d';' -f1; }

nodes=$(sinfo -h -N -p debug -o '%N' | sort -u | wc -l)
echo "cluster: $nodes nodes ($(sinfo -h -p debug -o '%N')), $(scontrol show config | awk -F'= ' '/^MaxArraySize/ {print "MaxArraySize=" $2}')"

# 1. one task on each node: each node has its own hostname
got=$(srun -N"$nodes" -n"$nodes" hostname 2>&1 | sort | paste -sd' ' -)
want=$(for ((i = 1; i <= nodes; i++)); do echo "n$i"; done | paste -sd' ' -)
[[ $got == "$want" ]] && ok "srun -N$nodes -n$nodes hostname: $got" || bad "srun hostname: got '$got', want '$want'"

# 2. sbatch -> COMPLETED in sacct; submit-to-start latency (3 jobs, one after another)
lat=()
for k in 1 2 3; do
	t0=$(now)
	id=$(sbatch_id -o "$TMP/lat-$k.out" --wrap "date +%s.%N")
	t1=$(now)
	JOBS+=("$id")
	if wait_file "$TMP/lat-$k.out" 1 20; then
		lat+=("$(secs "$t0" "$(head -n 1 "$TMP/lat-$k.out")")")
	fi
done
if ((${#lat[@]} == 3)); then ok "submit to start: ${lat[*]} s (sbatch call $(secs "$t0" "$t1") s)"; else bad "latency jobs did not start"; fi
id=$(sbatch_id -o /dev/null --wrap 'sleep 1')
JOBS+=("$id")
t0=$(now)
if wait_state "$id" COMPLETED 30; then ok "sbatch --wrap 'sleep 1': job $id COMPLETED in sacct ($(secs "$t0" "$(now)") s after submit)"; else bad "job $id: sacct state '$(state "$id")'"; fi

# 3. a 5-task array
# shellcheck disable=SC2016 # expanded in the job
id=$(sbatch_id --array=0-4 -o "$TMP/arr-%a.out" --wrap 'echo "$SLURM_ARRAY_TASK_ID $(hostname)"')
JOBS+=("$id")
t0=$(now)
if wait_state "$id" COMPLETED 60; then
	tasks=$(cat "$TMP"/arr-*.out | awk '{print $1}' | sort -n | paste -sd' ' -)
	[[ $tasks == "0 1 2 3 4" ]] && ok "array 0-4: all COMPLETED in $(secs "$t0" "$(now)") s, on $(cat "$TMP"/arr-*.out | awk '{print $2}' | sort -u | paste -sd, -)" ||
		bad "array outputs: '$tasks'"
else bad "array $id: states '$(state "$id" | paste -sd, -)'"; fi

# 4. scontrol requeue of a running job: it runs again with SLURM_RESTART_COUNT=1
cat >"$TMP/requeue.sh" <<EOF
#!/bin/bash
echo "\$(date +%s.%N) \${SLURM_RESTART_COUNT:-unset}" >> $TMP/requeue.log
[ -n "\$SLURM_RESTART_COUNT" ] || sleep 120
EOF
id=$(sbatch_id -o /dev/null "$TMP/requeue.sh")
JOBS+=("$id")
if wait_file "$TMP/requeue.log" 1 20; then
	t0=$(now)
	scontrol requeue "$id"
	if wait_file "$TMP/requeue.log" 2 60; then
		t1=$(tail -n 1 "$TMP/requeue.log" | awk '{print $1}')
		rc=$(tail -n 1 "$TMP/requeue.log" | awk '{print $2}')
		[[ $rc == 1 ]] && ok "scontrol requeue: restarted $(secs "$t0" "$t1") s later with SLURM_RESTART_COUNT=$rc" ||
			bad "requeue: SLURM_RESTART_COUNT=$rc"
	else bad "requeued job $id did not run again within 60 s"; fi
else bad "requeue job $id did not start"; fi

# 5. accounting is enforced: a known account/QOS/constraint runs, an unknown account is refused
id=$(sbatch_id -o /dev/null --account=trainyard --qos=normal --constraint=cpu --time=1 --wrap true)
JOBS+=("$id")
if wait_state "$id" COMPLETED 30; then ok "--account=trainyard --qos=normal --constraint=cpu --time=1: COMPLETED"; else bad "account job $id: '$(state "$id")'"; fi
if out=$(sbatch --parsable -o /dev/null --account=no_such_account --wrap true 2>&1); then
	JOBS+=("${out%%;*}")
	bad "--account=no_such_account was accepted"
else ok "--account=no_such_account refused: ${out##*error: }"; fi

# 6. MaxArraySize: indices 0-1000 are accepted (held, then cancelled), 1001 is not
if id=$(sbatch_id --hold --array=0-1000 -o /dev/null --wrap true 2>&1); then
	scancel "$id"
	ok "--array=0-1000 accepted (MaxArraySize=1001)"
else bad "--array=0-1000 refused: $id"; fi
if out=$(sbatch --parsable --hold --array=1001 -o /dev/null --wrap true 2>&1); then
	scancel "${out%%;*}"
	bad "--array=1001 accepted"
else ok "--array=1001 refused"; fi

# 7. preemption: a job in partition low is requeued when a debug job needs its CPUs
if [[ ${SMOKE_PREEMPT:-1} == 1 ]]; then
	cpus=$(sinfo -h -N -p low -o '%c' | head -n 1)
	cat >"$TMP/low.sh" <<EOF
#!/bin/bash
echo "start \$(date +%s.%N) \${SLURM_RESTART_COUNT:-0}" >> $TMP/low.log
trap 'echo "term \$(date +%s.%N)" >> $TMP/low.log; exit 0' TERM
sleep 120 & wait
EOF
	low=$(sbatch_id -p low -N"$nodes" --ntasks-per-node="$cpus" -o /dev/null "$TMP/low.sh")
	JOBS+=("$low")
	if wait_file "$TMP/low.log" 1 20; then
		t0=$(now)
		hi=$(sbatch_id -o "$TMP/hi.out" --wrap 'date +%s.%N')
		JOBS+=("$hi")
		if wait_file "$TMP/hi.out" 1 30 && grep -q '^term' "$TMP/low.log"; then
			ok "preemption: low job $low got SIGTERM, debug job started $(secs "$t0" "$(head -n 1 "$TMP/hi.out")") s after submit"
			if wait_file "$TMP/low.log" 3 60; then
				ok "preempted job requeued: running again with SLURM_RESTART_COUNT=$(tail -n 1 "$TMP/low.log" | awk '{print $3}') $(secs "$t0" "$(tail -n 1 "$TMP/low.log" | awk '{print $2}')") s after the preemption"
			else bad "preempted job $low did not run again within 60 s"; fi
		else bad "preemption: debug job did not start or low job got no SIGTERM ($(cat "$TMP/low.log"))"; fi
	else bad "low job $low did not start"; fi
fi

echo "$PASS passed, $FAIL failed"
((FAIL == 0))
