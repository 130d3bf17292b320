# Shell helpers for the benchmark scripts that run local clusters (tools/plan-validate,
# tools/prefix-bench). Sourced; needs SPEEDCTL (the speedctl binary) set.
#
#   cluster_start ROUTER_PORT LOGDIR UP_ARGS...   speedctl up UP_ARGS in the background, logs in
#                                                 LOGDIR; returns once the router serves
#                                                 /v1/models and every node is up (1 if it never
#                                                 comes up: the output is on stderr)
#   cluster_stop                                  stops it (SIGTERM: the nodes drain) and waits
#   CLUSTER_PID                                   the speedctl up process while one runs
CLUSTER_PID=

cluster_stop() {
    if [ -n "$CLUSTER_PID" ]; then
        kill -TERM "$CLUSTER_PID" 2>/dev/null || true
        wait "$CLUSTER_PID" 2>/dev/null || true
        CLUSTER_PID=
    fi
}

cluster_start() {
    local port=$1 logdir=$2
    shift 2
    mkdir -p "$logdir"
    "$SPEEDCTL" up "$@" --log-dir "$logdir" >"$logdir/up.out" 2>&1 &
    CLUSTER_PID=$!
    for _ in $(seq 1 600); do
        if curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1 && grep -q "^cluster up in" "$logdir/up.out"; then
            sleep 1 # the router's first status poll of every node
            return 0
        fi
        kill -0 "$CLUSTER_PID" 2>/dev/null || { cat "$logdir/up.out" >&2; return 1; }
        sleep 0.2
    done
    echo "the cluster did not come up in 120 s; see $logdir" >&2
    return 1
}
