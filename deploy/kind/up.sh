#!/usr/bin/env bash
# `make kind-up`: a kind cluster with Calico (NetworkPolicies enforced) and the KubeRay operator, the
# llmp images built and loaded into it, the chart installed with values-ci.yaml into a namespace
# that enforces the restricted Pod Security Standard, everything waited for, then `helm test`.
# Needs docker (or podman: ENGINE=podman), kind, kubectl and helm, and the network for Calico's
# manifest, KubeRay's chart and the images' packages. Run again: each step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${KIND_CLUSTER:-llmp}
NAMESPACE=${LLMP_KIND_NAMESPACE:-llmp}
RELEASE=${LLMP_KIND_RELEASE:-llmp}
ENGINE=${ENGINE:-docker}
TAG=${IMAGE_TAG:-dev}
CALICO_VERSION=${CALICO_VERSION:-v3.29.2}
KUBERAY_VERSION=${KUBERAY_VERSION:-1.6.2}
SERVICES=(tokenizer gateway retrieval training inference)
CONTEXT=kind-$CLUSTER
k() { kubectl --context "$CONTEXT" "$@"; }
step() { printf '\n== %s\n' "$*"; }

if [ "$ENGINE" = podman ]; then export KIND_EXPERIMENTAL_PROVIDER=podman; fi

step "cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --config deploy/kind/cluster.yaml

step "Calico $CALICO_VERSION"
k apply --server-side -f "https://raw.githubusercontent.com/projectcalico/calico/$CALICO_VERSION/manifests/calico.yaml"
k -n kube-system rollout status daemonset/calico-node --timeout=600s
k wait --for=condition=Ready nodes --all --timeout=300s

step "KubeRay operator $KUBERAY_VERSION"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
helm --kube-context "$CONTEXT" upgrade --install kuberay-operator kuberay/kuberay-operator \
  --version "$KUBERAY_VERSION" -n kuberay-system --create-namespace --wait --timeout 10m

step "images ($ENGINE, tag $TAG)"
make images-cpu ENGINE="$ENGINE" IMAGE_TAG="$TAG"
for s in "${SERVICES[@]}"; do
  if [ "$ENGINE" = podman ]; then
    archive=$(mktemp --suffix .tar)
    podman save -o "$archive" "localhost/llmp-$s:$TAG"
    kind load image-archive --name "$CLUSTER" "$archive"
    rm -f "$archive"
  else
    kind load docker-image --name "$CLUSTER" "llmp-$s:$TAG"
  fi
done

step "llmp in namespace $NAMESPACE"
k create namespace "$NAMESPACE" --dry-run=client -o yaml | k apply -f -
k label --overwrite namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=restricted
helm --kube-context "$CONTEXT" upgrade --install "$RELEASE" deploy/helm/llmp -n "$NAMESPACE" \
  -f deploy/helm/llmp/values-ci.yaml --set image.tag="$TAG" \
  $([ "$ENGINE" = podman ] && echo --set image.registry=localhost) --wait --timeout 20m

step "the RayService's Ray nodes"
end=$((SECONDS + 900))
until k -n "$NAMESPACE" get pods -l llmp.dev/ray-cluster=inference -o name | grep -q .; do
  [ $SECONDS -lt $end ] || { k -n "$NAMESPACE" describe rayservice; exit 1; }
  sleep 5
done
k -n "$NAMESPACE" wait --for=condition=Ready pods -l llmp.dev/ray-cluster=inference --timeout=900s

step "helm test"
helm --kube-context "$CONTEXT" test "$RELEASE" -n "$NAMESPACE" --logs --timeout 10m
