#!/bin/bash
# The Kubernetes manifests (docs/kubernetes.md), validated offline against the API schemas by
# tools/k8s-validate (kubernetes-models; PodMonitor by the prometheus-operator models):
#   1. deploy/k8s/base is exactly what `speedctl k8s deploy/clusters/1p1d.yaml` writes;
#   2. it validates, and so does a fresh emit of every cluster file in deploy/clusters and of a
#      cuda pool with tensor_parallel 2 (nvidia.com/gpu: 2 per decode pod);
#   3. the validator rejects broken manifests (a string where an integer goes, a container
#      without an image, a container without a name, a kind it has no schema for, a duplicate
#      key, a misspelt field — which the API schemas alone accept), so a pass means something;
#   4. speedctl k8s refuses bad input with a clear error (a name that is not a DNS label, no
#      image, a bad quantity).
# Usage: test_k8s_manifests.sh SOURCE_DIR SPEEDCTL. Exits 77 when the validator's packages are not
# installed (deploy/setup.sh installs them) or node is missing.
set -u
src=$1
speedctl=$2
val=$src/tools/k8s-validate
if ! command -v node >/dev/null; then echo "SKIP: node is not installed (deploy/setup.sh)"; exit 77; fi
if [ ! -d "$val/node_modules/kubernetes-models" ]; then
    echo "SKIP: $val/node_modules is missing: run deploy/setup.sh (npm ci there)"
    exit 77
fi
tmp=$(mktemp -d "${SPEED_TEST_TMP:-/tmp}/k8s.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT
fails=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
validate() { node "$val/validate.mjs" "$@" >"$tmp/val.log" 2>&1; }

# 1. the committed base is the emitter's output
"$speedctl" k8s "$src/deploy/clusters/1p1d.yaml" --out "$tmp/base" --image speedserve:latest >/dev/null ||
    fail "speedctl k8s 1p1d.yaml"
diff -r "$src/deploy/k8s/base" "$tmp/base" >"$tmp/diff.log" ||
    { fail "deploy/k8s/base differs from speedctl k8s deploy/clusters/1p1d.yaml (regenerate it):"; cat "$tmp/diff.log"; }

# 2. committed and fresh manifests validate
validate "$src/deploy/k8s/base" || { fail "deploy/k8s/base does not validate"; cat "$tmp/val.log"; }
grep -q "PodMonitor/speedserve-pods" "$tmp/val.log" || fail "the PodMonitor was not validated"
n=0
for f in "$src"/deploy/clusters/*.yaml; do
    out=$tmp/emit-$(basename "$f" .yaml)
    "$speedctl" k8s "$f" --out "$out" --image registry.example/speedserve:1 --namespace llm >/dev/null ||
        fail "speedctl k8s $f"
    validate "$out" || { fail "the manifests of $f do not validate"; cat "$tmp/val.log"; }
    n=$((n + 1))
done
[ "$n" -ge 3 ] || fail "only $n cluster files in deploy/clusters"
cat >"$tmp/gpu.yaml" <<'YAML'
decode:
  replicas: 3
  backend: cuda
  tensor_parallel: 2
prefill:
  replicas: 2
  backend: cuda
YAML
"$speedctl" k8s "$tmp/gpu.yaml" --out "$tmp/gpu" --image speedserve:cuda >/dev/null || fail "speedctl k8s gpu.yaml"
validate "$tmp/gpu" || { fail "the gpu manifests do not validate"; cat "$tmp/val.log"; }
grep -q 'nvidia.com/gpu: "2"' "$tmp/gpu/decode.yaml" || fail "decode pods do not ask for tensor_parallel GPUs"
grep -q 'nvidia.com/gpu: "1"' "$tmp/gpu/prefill.yaml" || fail "prefill pods do not ask for one GPU"
grep -q '^  replicas: 3$' "$tmp/gpu/decode.yaml" || fail "decode replicas are not the cluster file's"
grep -q 'nvidia.com/gpu' "$tmp/base/decode.yaml" && fail "a cpu pool asks for GPUs"

# 2b. speedctl plan --emit k8s: the manifests of its recommendation validate too
cat >"$tmp/profile.json" <<'JSON'
{"schema": "speedserve-profile/1", "model": {"path": "/models/m", "layers": 8, "kv_bytes_per_token_layer": 512},
 "backend": "cpu", "threads": 1, "tensor_parallel": 1, "engine": {"max_step_tokens": 512, "prefill_chunk": 512},
 "depths": [{"prefill_layers": 8, "prefill": [{"tokens": 1, "ms": 0.1}, {"tokens": 1024, "ms": 102.4}],
             "decode": [{"batch": 1, "context": 0, "ms": 1.5}, {"batch": 16, "context": 0, "ms": 9}]}]}
JSON
"$speedctl" plan --profile "$tmp/profile.json" --rate 120 --prompt-tokens fixed:100 --output-tokens fixed:4 \
    --slo-ttft-p90-ms 200 --slo-tpot-p90-ms 50 --max-nodes 3 --requests 500 --emit k8s --image speedserve:1 \
    --out "$tmp/plan" >/dev/null || fail "speedctl plan --emit k8s"
validate "$tmp/plan/k8s" || { fail "the manifests of speedctl plan --emit k8s do not validate"; cat "$tmp/val.log"; }
grep -q '^  replicas: 2$' "$tmp/plan/k8s/prefill.yaml" || fail "plan --emit k8s: prefill replicas are not the plan's"

# 3. broken manifests are rejected
neg() { # name, sed script applied to a copy of base/decode.yaml
    mkdir -p "$tmp/neg"
    sed "$2" "$tmp/base/decode.yaml" >"$tmp/neg/$1.yaml"
    cmp -s "$tmp/base/decode.yaml" "$tmp/neg/$1.yaml" && { fail "negative case $1: the edit changed nothing"; return; }
    if validate "$tmp/neg/$1.yaml"; then fail "a manifest with $1 was accepted"; else grep ERR "$tmp/val.log"; fi
}
neg "replicas as a string" 's/^  replicas: 1$/  replicas: "one"/'
neg "a port as a string" 's/^              containerPort: 8300$/              containerPort: grpc/'
neg "no container image" '/^          image: /d'
neg "a container without a name" 's/^        - name: decode$/        - tty: false/'
neg "an unknown kind" 's/^kind: StatefulSet$/kind: StatefulSett/'
neg "a duplicate key" 's/^  replicas: 1$/  replicas: 1\n  replicas: 2/'
neg "a misspelt field" 's/readinessProbe:/readynessProbe:/'
neg "a misspelt spec field" 's/^  replicas: 1$/  replica: 1/'
grep -q "must be integer" <(node "$val/validate.mjs" "$tmp/neg/replicas as a string.yaml") ||
    fail "the schema error does not say what is wrong"
grep -q "containers/0/readynessProbe: unknown field (readinessProbe?)" <(node "$val/validate.mjs" "$tmp/neg/a misspelt field.yaml") ||
    fail "the unknown-field error does not name the field, its path and the likely one"

# 4. bad input to the emitter
bad() { # what, args...
    local what=$1
    shift
    if "$speedctl" k8s "$src/deploy/clusters/1p1d.yaml" --out "$tmp/bad" "$@" >"$tmp/bad.log" 2>&1; then
        fail "speedctl k8s accepted $what"
    elif ! grep -q "error" "$tmp/bad.log"; then
        fail "speedctl k8s: no error message for $what"; cat "$tmp/bad.log"
    fi
}
bad "a name that is not a DNS label" --image x --name Speed_Serve
bad "no image" --name speedserve
bad "a bad memory quantity" --image x --memory-limit 8GB
bad "a relative model directory" --image x --model-dir models

[ $fails -eq 0 ] && echo "k8s manifests: all checks passed" && exit 0
echo "$fails failure(s)"
exit 1
