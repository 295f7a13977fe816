#!/usr/bin/env bash
# kube-dsr on a kind cluster, from images to answered requests.
#
#   e2e/kind/run.sh          create (or reuse) the cluster, build and load the
#                            images, install the chart, start a Deployment
#                            of web pods on every node and a DsrService for
#                            them, send requests
#   e2e/kind/run.sh down     remove the cluster
#
# NOT RUN IN CI: this repository's CI machine has no Docker engine. Written
# for a Linux machine with bash 4+, Docker, kind, helm and kubectl; see README.md
# beside this file for each step done by hand, and what is and is not
# covered.
#
# Environment: CLUSTER (kube-dsr), VIP (derived from the kind network),
# REQUESTS (40), SKIP_BUILD=1 (use images already loaded), AGNHOST, ALPINE.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLUSTER=${CLUSTER:-kube-dsr}
CONTEXT=kind-$CLUSTER
NETWORK=${KIND_EXPERIMENTAL_DOCKER_NETWORK:-kind}
NAMESPACE=kube-dsr
OPERATOR_IMAGE=ghcr.io/kube-dsr/dsr-operator:kind
AGENT_IMAGE=ghcr.io/kube-dsr/dsr-agent:kind
AGNHOST=${AGNHOST:-registry.k8s.io/e2e-test-images/agnhost:2.52}
ALPINE=${ALPINE:-docker.io/library/alpine:3.20}
REQUESTS=${REQUESTS:-40}
PODS=${PODS:-6}

log() { printf '\n==> %s\n' "$*"; }
die() {
    printf 'run.sh: %s\n' "$*" >&2
    exit 1
}
k() { kubectl --context "$CONTEXT" "$@"; }

need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed or not on PATH ($2)"
}

ip_to_int() {
    local a b c d
    IFS=. read -r a b c d <<<"$1"
    echo $(((a << 24) | (b << 16) | (c << 8) | d))
}

int_to_ip() {
    local n=$1
    echo "$(((n >> 24) & 255)).$(((n >> 16) & 255)).$(((n >> 8) & 255)).$((n & 255))"
}

down() {
    log "removing backend containers and the kind cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER"
}

# ------------------------------------------------------------------ checks
need docker "https://docs.docker.com/engine/install/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need helm "https://helm.sh/docs/intro/install/"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine: is it running, and may this user use it?"

case "${1:-up}" in
up) ;;
down)
    down
    exit 0
    ;;
*) die "usage: $0 [up|down]" ;;
esac

# ----------------------------------------------------------------- cluster
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "reusing kind cluster $CLUSTER"
else
    log "creating kind cluster $CLUSTER (1 control plane, 2 workers)"
    kind create cluster --name "$CLUSTER" --config "$HERE/cluster.yaml" --wait 3m
fi

minor=$(k get --raw /version | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p')
[[ -n "$minor" && "$minor" -ge 33 ]] ||
    die "the cluster runs Kubernetes 1.${minor:-?}; kube-dsr's CRDs need 1.33 or later (kind --image kindest/node:v1.33.x)"

mapfile -t NODES < <(kind get nodes --name "$CLUSTER")
mapfile -t WORKERS < <(printf '%s\n' "${NODES[@]}" | grep -v -- '-control-plane$' | sort)
[[ ${#WORKERS[@]} -ge 2 ]] || die "expected two worker nodes, found: ${WORKERS[*]:-none}"

log "mounting a bpffs of its own in every node (kind nodes have none)"
for node in "${NODES[@]}"; do
    docker exec "$node" sh -c 'findmnt -n -t bpf /sys/fs/bpf >/dev/null || mount -t bpf bpf /sys/fs/bpf'
    echo "$node: $(docker exec "$node" findmnt -n -o FSTYPE /sys/fs/bpf)"
done

# ------------------------------------------------------------------ images
if [[ "${SKIP_BUILD:-}" != 1 ]]; then
    log "building the images (images/Dockerfile)"
    docker build -f "$ROOT/images/Dockerfile" --target operator -t "$OPERATOR_IMAGE" "$ROOT"
    docker build -f "$ROOT/images/Dockerfile" --target agent -t "$AGENT_IMAGE" "$ROOT"
fi
log "loading the images into the nodes"
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$AGENT_IMAGE"

# ----------------------------------------------------------------- install
log "installing the chart (release kube-dsr, namespace $NAMESPACE)"
k create namespace "$NAMESPACE" --dry-run=client -o yaml | k apply -f -
k label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged --overwrite
helm upgrade --install kube-dsr "$ROOT/charts/kube-dsr" --kube-context "$CONTEXT" \
    --namespace "$NAMESPACE" -f "$HERE/values.yaml" --wait --timeout 5m
k -n "$NAMESPACE" get pods -o wide

log "labelling the ingress nodes: ${WORKERS[*]}"
for node in "${WORKERS[@]}"; do
    k label node "$node" kubedsr.io/ingress=true --overwrite
done

# --------------------------------------------------------------- addresses
subnet=$(docker network inspect "$NETWORK" -f '{{range .IPAM.Config}}{{println .Subnet}}{{end}}' | grep -v ':' | head -n 1)
[[ -n "$subnet" ]] || die "docker network $NETWORK has no IPv4 subnet"
prefix=${subnet#*/}
[[ "$prefix" -le 24 ]] || die "the $NETWORK network ($subnet) is smaller than a /24; set VIP=<a free address in it>"
if [[ -z "${VIP:-}" ]]; then
    # Docker hands out addresses from the bottom of the subnet; take one
    # near the top (172.18.255.200 in the usual 172.18.0.0/16).
    base=$(ip_to_int "${subnet%/*}")
    VIP=$(int_to_ip $((base + (1 << (32 - prefix)) - 56)))
fi
if docker network inspect "$NETWORK" -f '{{range .Containers}}{{println .IPv4Address}}{{end}}' | grep -q "^$VIP/"; then
    die "VIP $VIP is already used by a container on $NETWORK; set VIP=<a free address in $subnet>"
fi
log "kind network $NETWORK: $subnet, VIP $VIP"

# ---------------------------------------------------------------- backends
# Pods of a Deployment, spread over every node (control plane included):
# kindnet routes them behind their nodes (10.244.N.0/24 per node), so an
# ingress node reaches each through the pod's node (the node hop); kind's
# nodes share the `kind` bridge, the one L2 segment that needs.
log "deployment web: $PODS agnhost netexec pods spread over every node"
k apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: $PODS
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      tolerations:
        - key: node-role.kubernetes.io/control-plane
          effect: NoSchedule
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {app: web}
      containers:
        - name: web
          image: $AGNHOST
          args: [netexec, --http-port=80]
          ports: [{containerPort: 80}]
EOF
k -n default rollout status deployment/web --timeout=180s
k -n default get pods -l app=web -o wide

log "applying DsrService default/web (VIP $VIP, selector app=web)"
k apply -f - <<EOF
apiVersion: kubedsr.io/v1alpha1
kind: DsrService
metadata:
  name: web
  namespace: default
spec:
  vips: [$VIP]
  ports:
    - name: http
      port: 80
      protocol: TCP
  selector:
    app: web
  ingress:
    nodeSelector:
      kubedsr.io/ingress: "true"
EOF
k -n default wait dsrsvc/web --for=condition=Programmed --timeout=120s
k -n default get dsrsvc web -o wide
k get dsrnode

# ---------------------------------------------------------------- traffic
log "$REQUESTS HTTP requests to http://$VIP/hostname from a client container on $NETWORK"
out=$(docker run --rm --network "$NETWORK" "$ALPINE" sh -c \
    "for i in \$(seq $REQUESTS); do wget -q -O - -T 3 http://$VIP/hostname || printf FAILED; echo; done")
printf '%s\n' "$out" | sort | uniq -c
failed=$(printf '%s\n' "$out" | grep -c FAILED || true)
[[ "$failed" -eq 0 ]] || die "$failed of $REQUESTS requests failed (see README.md, Troubleshooting)"
for pod in $(k -n default get pods -l app=web -o jsonpath='{.items[*].metadata.name}'); do
    node=$(k -n default get pod "$pod" -o jsonpath='{.spec.nodeName}')
    printf '%s\n' "$out" | grep -qx "$pod" || die "pod $pod (on $node) answered none of $REQUESTS requests"
    echo "$pod on $node answered $(printf '%s\n' "$out" | grep -cx "$pod")"
done

announcer=$(k -n default get dsrsvc web -o jsonpath='{.status.vips[0].announcingNode}')
if [[ -n "$announcer" ]]; then
    node_ip=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NETWORK\").IPAddress}}" "$announcer")
    log "agent metrics on the announcing node $announcer ($node_ip:9477)"
    docker run --rm --network "$NETWORK" "$ALPINE" wget -q -O - -T 3 "http://$node_ip:9477/metrics" |
        grep -E '^kubedsr_agent_(xdp_attached|vip_packets_total|backend_bytes_total)' || true
else
    announcer="(status names no announcing node yet)"
fi

log "requests succeed: $REQUESTS/$REQUESTS answered, by every pod on every node, through $announcer"
echo "Next: e2e/kind/README.md (scenarios, pod backends, cleanup). Remove everything: $0 down"
