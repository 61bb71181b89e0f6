#!/usr/bin/env bash
# What a failed kind run leaves to read: every pod, the llmp namespace's events, descriptions and logs.
set -uo pipefail
CONTEXT=kind-${KIND_CLUSTER:-llmp}
NAMESPACE=${LLMP_KIND_NAMESPACE:-llmp}
OUT=${1:-kind-diagnostics}
mkdir -p "$OUT"
k() { kubectl --context "$CONTEXT" "$@"; }
k get pods -A -o wide > "$OUT/pods.txt" 2>&1
k -n "$NAMESPACE" get events --sort-by=.lastTimestamp > "$OUT/events.txt" 2>&1
k -n "$NAMESPACE" describe pods > "$OUT/describe-pods.txt" 2>&1
k -n "$NAMESPACE" get rayservices,rayjobs,rayclusters -o yaml > "$OUT/ray.yaml" 2>&1
for pod in $(k -n "$NAMESPACE" get pods -o name); do
  k -n "$NAMESPACE" logs "$pod" --all-containers --tail=500 > "$OUT/$(basename "$pod").log" 2>&1
done
k -n kuberay-system logs deploy/kuberay-operator --tail=500 > "$OUT/kuberay-operator.log" 2>&1
