#!/usr/bin/env bash
# `make docker-test`: build the peer image, run docker/compose.yaml (bootstrap + 3 peers), check it from the
# host, then remove the containers, volumes, the peer image and (if this script started it) the engine.
# The imported Debian base image is kept, so a rerun skips debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
IMAGE=${EFEDLLM_IMAGE:-efedllm-peer:test}
BASE_IMAGE=${BASE_IMAGE:-efedllm-base:bookworm}
QUESTION="What is the capital of France?"
MAX_NEW_TOKENS=32
WORK=$(mktemp -d /tmp/efedllm-docker-test.XXXXXX)
export EFEDLLM_IMAGE=$IMAGE COMPOSE_PROJECT_NAME=efedllm-docker-test
COMPOSE_FILES=(-f docker/compose.yaml)
STARTED_ENGINE=
TIMES=()
T0=$(date +%s)

log() { echo "[docker-test $(date +%T)] $*"; }
step() {  # step NAME COMMAND...: run it, remember how long it took
    local name=$1 began=$(date +%s); shift
    log "== $name"
    "$@"
    TIMES+=("$(printf '%-34s %5d s' "$name" $(( $(date +%s) - began )))")
}
compose() { docker-compose "${COMPOSE_FILES[@]}" "$@"; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        if (( $(date +%s) > deadline )); then log "timed out waiting for $what"; return 1; fi
        sleep 3
    done
}

cleanup() {
    local rc=$?
    set +e
    if (( rc != 0 )) && docker info >/dev/null 2>&1; then
        log "failed (exit $rc); last container logs:"
        compose logs --tail=40 2>&1 | tail -n 200
    fi
    if docker info >/dev/null 2>&1; then
        compose down --volumes --remove-orphans >/dev/null 2>&1
        if [[ -z ${KEEP_IMAGE:-} ]]; then  # KEEP_IMAGE=1: keep the image and its build cache (for development)
            docker image rm -f "$IMAGE" >/dev/null 2>&1
            docker image prune -f >/dev/null 2>&1  # the build stage's untagged layers
        fi
    fi
    if [[ -n $STARTED_ENGINE ]]; then
        kill "$STARTED_ENGINE" 2>/dev/null && wait "$STARTED_ENGINE" 2>/dev/null
        log "stopped the Docker engine this run started"
    fi
    rm -rf "$WORK" docker/wheels/torch-*.whl docker/build-secrets/*.crt
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

engine() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if (( ${#missing[@]} )); then
        log "installing ${missing[*]} with apt"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! docker info >/dev/null 2>&1; then
        log "starting dockerd (vfs storage, host networking only)"
        dockerd --storage-driver=vfs --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
        STARTED_ENGINE=$!
        wait_for 60 "the Docker engine" docker info
    fi
    df -h /var/lib/docker | tail -1
}

base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE is cached"
    else
        docker/base.sh "$BASE_IMAGE"
    fi
}

build() {
    local args=(--build-arg "BASE=$BASE_IMAGE")
    if ls /opt/wheels/torch-*.whl >/dev/null 2>&1; then  # a local CPU torch wheel saves a large download
        cp /opt/wheels/torch-*.whl docker/wheels/
    fi
    if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then  # the host's CA bundle, for pip in the build stage only
        cp /etc/ssl/certs/ca-certificates.crt docker/build-secrets/host-ca.crt
        args+=(--build-arg PIP_CERT=host-ca.crt)
    fi
    local began=$(date +%s)
    DOCKER_BUILDKIT=0 docker build --force-rm --network host -f docker/Dockerfile -t "$IMAGE" "${args[@]}" . >"$WORK/build.log" 2>&1 \
        || { tail -n 60 "$WORK/build.log"; return 1; }
    BUILD_SECONDS=$(( $(date +%s) - began ))
    docker run --rm --network host "$IMAGE" --help >/dev/null  # the entrypoint runs
    IMAGE_SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')
    log "image $IMAGE: $IMAGE_SIZE, built in $BUILD_SECONDS s"
}

bootstrap_addr() {
    compose logs bootstrap 2>/dev/null | grep -o '/ip4/127.0.0.1/tcp/31337/p2p/[A-Za-z0-9]*' | head -1
}

start_swarm() {
    [[ -f /etc/ssl/certs/ca-certificates.crt ]] && COMPOSE_FILES+=(-f docker/compose.host-ca.yaml)
    compose up -d bootstrap
    wait_for 90 "the bootstrap node" bootstrap_addr
    export SWARM_INITIAL_PEERS=$(bootstrap_addr)
    log "SWARM_INITIAL_PEERS=$SWARM_INITIAL_PEERS"
    compose up -d peer1 peer2 peer3
}

swarm_complete() {  # every block served by a reachable peer, three peers online
    "$PY" -m peers.cli status --json >"$WORK/status.json" 2>/dev/null || return 1
    "$PY" - "$WORK/status.json" <<'PYEOF'
import json, sys
report = json.load(open(sys.argv[1]))
online = [p for p in report["peers"] if p["state"] == "online" and p["rtt_ms"] is not None]
sys.exit(0 if not report["missing_blocks"] and len(online) == 3 else 1)
PYEOF
}

coverage() {
    wait_for 900 "three peers covering every block" swarm_complete
    "$PY" -m peers.cli status | tee "$WORK/status.txt"
    grep -q "All 30 blocks are served." "$WORK/status.txt"
    local peer; for peer in docker-peer1 docker-peer2 docker-peer3; do grep -q "$peer" "$WORK/status.txt"; done
}

chat() {
    "$PY" -m apps.chat --prompt "$QUESTION" --max-new-tokens "$MAX_NEW_TOKENS" >"$WORK/answer.txt"
    log "answer through the containers: $(cat "$WORK/answer.txt")"
    "$PY" docker/compare_answer.py "$QUESTION" "$MAX_NEW_TOKENS" "$WORK/answer.txt"
}

online_id() { compose logs "$1" 2>/dev/null | grep -o 'ONLINE: serving blocks [0-9:]* of [^ ]* as [A-Za-z0-9]*' | awk '{print $NF}'; }

peer2_online() { compose logs peer2 | grep -q 'ONLINE: serving'; }

restart_peer() {
    local before after
    before=$(online_id peer2 | tail -1)
    compose rm --stop --force peer2 >/dev/null  # a new container: only the named volumes carry over
    compose up -d peer2
    wait_for 300 "peer2 back online" peer2_online
    after=$(online_id peer2 | tail -1)
    log "peer2 id before: $before, after: $after"
    [[ -n $before && $before == "$after" ]] || { log "the peer id changed"; return 1; }
    if compose logs peer2 | grep -Eq 'converting|downloading'; then log "peer2 converted the model again"; return 1; fi
    log "peer2 came back with the same id and did not download or convert the model"
    wait_for 300 "the swarm complete again" swarm_complete
}

all_healthy() {
    local ids status
    ids=$(compose ps -q)
    [[ $(echo "$ids" | wc -l) -eq 4 ]] || return 1
    for id in $ids; do
        status=$(docker inspect -f '{{.Name}} {{.State.Health.Status}}' "$id")
        [[ $status == *" healthy" ]] || return 1
    done
}

healthy() {
    wait_for 300 "every container healthy" all_healthy
    for id in $(compose ps -q); do docker inspect -f '  {{.Name}}: {{.State.Health.Status}}' "$id"; done
}

step "engine up" engine
step "base image" base
step "image build" build
step "swarm start (bootstrap)" start_swarm
step "peers online, coverage" coverage
step "chat through the containers" chat
step "peer restart (same id, no convert)" restart_peer
step "all containers healthy" healthy
step "teardown" compose down --volumes --remove-orphans

echo
echo "docker-test passed: image $IMAGE_SIZE, built in $BUILD_SECONDS s, whole run $(( $(date +%s) - T0 )) s"
printf '  %s\n' "${TIMES[@]}"
