# shellcheck shell=bash
# agent_lib.sh: helpers for tests that run two node agents from $T/cluster.toml with
# admin sockets $T/NODE.sock. Sourced after lib.sh (needs MIRRORDISK, MIRRORCTL,
# PYTHON, T, track_pid, wait_until, fail, pass, check_eq).
#   start_agent NODE          start it (log in $T/server-NODE.log), wait for its socket
#   stop_agent NODE           SIGTERM, check exit status 0
#   jget NODE EXPR            a Python expression on the first mirror's status (m)
#   wait_for NODE EXPR WANT S poll until EXPR prints WANT, at most S seconds
#   two_node_config NAME [LINE...]
#                             a fresh secret ($T/secret), ports A_REPL B_REPL A_NBD B_NBD
#                             and $T/cluster.toml: cluster NAME, nodes alpha (id 1) and
#                             beta (id 2), mirror "db" on $S/alpha.img and $S/beta.img
#                             with peer_timeout_ms = 2000 and the mirror LINEs given

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
two_node_config() { # NAME [MIRROR_LINE...]
	local name=$1 line extra=""
	shift
	for line in "$@"; do extra+="$line"$'\n'; done
	head -c 32 /dev/urandom | base64 >"$T/secret"
	chmod 600 "$T/secret"
	A_REPL=$(free_port)
	B_REPL=$(free_port)
	A_NBD=$(free_port)
	B_NBD=$(free_port)
	cat >"$T/cluster.toml" <<EOF
[cluster]
name = "$name"
secret_file = "$T/secret"

[[node]]
name = "alpha"
id = 1
admin_socket = "$T/alpha.sock"

[[node]]
name = "beta"
id = 2
admin_socket = "$T/beta.sock"

[[mirror]]
name = "db"
peer_timeout_ms = 2000
$extra
[mirror.node.alpha]
device = "$S/alpha.img"
replication = ["127.0.0.1:$A_REPL"]
nbd_listen = "127.0.0.1:$A_NBD"

[mirror.node.beta]
device = "$S/beta.img"
replication = ["127.0.0.1:$B_REPL"]
nbd_listen = "127.0.0.1:$B_NBD"
EOF
}
