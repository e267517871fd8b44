# shellcheck shell=bash
# agent_lib.sh: helpers for tests that run two node agents from $T/cluster.toml with
# admin sockets $T/NODE.sock. Sourced after lib.sh (needs MIRRORDISK, MIRRORCTL,
# PYTHON, T, track_pid, wait_until, fail, pass, check_eq).
#   start_agent NODE          start it (log in $T/server-NODE.log), wait for its socket
#   stop_agent NODE           SIGTERM, check exit status 0
#   jget NODE EXPR            a Python expression on the first mirror's status (m)
#   wait_for NODE EXPR WANT S poll until EXPR prints WANT, at most S seconds

declare -A PIDS=()
start_agent() { # NODE
	echo "==== start $1" >>"$T/server-$1.log"
	"$MIRRORDISK" agent --config "$T/cluster.toml" --node "$1" </dev/null >>"$T/server-$1.log" 2>&1 &
	PIDS[$1]=$!
	track_pid "${PIDS[$1]}"
	wait_until 10 "$MIRRORCTL" status --socket "$T/$1.sock" >/dev/null 2>&1 ||
		fail "agent $1 did not answer within 10 s"
}
stop_agent() { # NODE: SIGTERM, exit 0
	local rc=0
	kill -TERM "${PIDS[$1]}"
	wait "${PIDS[$1]}" || rc=$?
	check_eq "agent $1 exit status after SIGTERM" "$rc" 0
}
jget() { # NODE EXPR (Python on m)
	"$MIRRORCTL" status --json --socket "$T/$1.sock" |
		"$PYTHON" -c "import json,sys; m=json.load(sys.stdin)['mirrors'][0]; print($2)"
}
wait_for() { # NODE EXPR WANT TIMEOUT_S
	wait_until "$4" bash -c "[ \"\$(\"$MIRRORCTL\" status --json --socket '$T/$1.sock' | \"$PYTHON\" -c \"import json,sys; m=json.load(sys.stdin)['mirrors'][0]; print($2)\")\" = '$3' ]" ||
		fail "$1: $2 did not become '$3' within $4 s (now: $(jget "$1" "$2"))"
	pass "$1: $2 = $3"
}
