#!/usr/bin/env bash
# Build shoal's local images and test binaries. Nothing is pulled from any registry:
# Go programs are compiled with Debian's golang-go (GOPATH mode, CGO off, so the
# binaries are static) and copied into `FROM scratch` images.
#
#   examples/hello-world/hello.go -> build/bin/hello  -> shoal-example/hello-world:latest
#   tests/images/whoami/main.go   -> build/bin/whoami -> shoal-test/whoami:latest
#
# build/bin/whoami is also what the process driver's tests run.
#
# Idempotent and fast when nothing changed: every output carries a hash of its inputs
# (a `<binary>.hash` stamp file; an `io.shoal.source-hash` image label) and is rebuilt
# only when that hash differs. Concurrent runs serialise on a lock file.
#
# Usage: scripts/build-images.sh [--binaries-only]
# Environment: SHOAL_BUILD_DIR (default <repo>/build), GOCACHE (default under it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${SHOAL_BUILD_DIR:-$ROOT/build}
BINARIES_ONLY=0
case "${1:-}" in
    "") ;;
    --binaries-only) BINARIES_ONLY=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "build-images.sh: unknown argument: $1" >&2; exit 2 ;;
esac

die() { echo "build-images.sh: $*" >&2; exit 1; }

command -v go >/dev/null || die "go not found: install Debian's golang-go (apt-get install golang-go)"
if [ "$BINARIES_ONLY" = 0 ]; then
    command -v docker >/dev/null || die "docker not found: run scripts/ensure-docker.sh"
    docker info >/dev/null 2>&1 || die "Docker Engine does not answer: run scripts/ensure-docker.sh"
fi

mkdir -p "$BUILD/bin" "$BUILD/images" "$BUILD/go/path"
exec 9>"$BUILD/.build-images.lock"
flock 9

# GOPATH mode with no network: a private GOPATH, a cache that works without $HOME.
export GO111MODULE=off CGO_ENABLED=0 GOPROXY=off GOFLAGS=
export GOPATH="$BUILD/go/path"
export GOCACHE="${GOCACHE:-$BUILD/go/cache}"
GO_VERSION=$(go version)

# hash_inputs FILE... : a short hash of the files' contents plus the Go toolchain.
hash_inputs() {
    { printf '%s\n' "$GO_VERSION"; cat "$@"; } | sha256sum | cut -c1-16
}

# build_binary SOURCE OUTPUT
build_binary() {
    local src=$1 out=$2 hash
    hash=$(hash_inputs "$src")
    if [ -x "$out" ] && [ "$(cat "$out.hash" 2>/dev/null)" = "$hash" ]; then
        echo "up to date: $out"
        return
    fi
    echo "building $out from ${src#"$ROOT"/}"
    go build -trimpath -ldflags '-s -w' -o "$out.tmp" "$src"
    mv -f "$out.tmp" "$out"
    echo "$hash" >"$out.hash"
}

# build_image TAG DOCKERFILE BINARY
build_image() {
    local tag=$1 dockerfile=$2 binary=$3 hash current ctx old_id new_id
    hash=$(hash_inputs "$dockerfile" "$binary")
    current=$(docker image inspect --format '{{ index .Config.Labels "io.shoal.source-hash" }}' "$tag" 2>/dev/null || true)
    old_id=$(docker image inspect --format '{{ .Id }}' "$tag" 2>/dev/null || true)
    if [ "$current" = "$hash" ]; then
        echo "up to date: $tag"
        return
    fi
    echo "building image $tag"
    ctx="$BUILD/images/${tag//[\/:]/_}"
    rm -rf "$ctx"
    mkdir -p "$ctx"
    cp "$dockerfile" "$ctx/Dockerfile"
    cp "$binary" "$ctx/"
    # The legacy builder needs neither buildx nor network for a FROM scratch image.
    DOCKER_BUILDKIT=0 docker build --quiet --label "io.shoal.source-hash=$hash" -t "$tag" "$ctx" >/dev/null 2>"$ctx/build.log" \
        || { cat "$ctx/build.log" >&2; die "docker build of $tag failed"; }
    new_id=$(docker image inspect --format '{{ .Id }}' "$tag")
    # The previous build is now untagged; drop it unless a container still uses it.
    if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
        docker image rm "$old_id" >/dev/null 2>&1 || true
    fi
}

build_binary "$ROOT/examples/hello-world/hello.go" "$BUILD/bin/hello"
build_binary "$ROOT/tests/images/whoami/main.go" "$BUILD/bin/whoami"

if [ "$BINARIES_ONLY" = 0 ]; then
    build_image shoal-example/hello-world:latest "$ROOT/examples/hello-world/Dockerfile" "$BUILD/bin/hello"
    build_image shoal-test/whoami:latest "$ROOT/tests/images/whoami/Dockerfile" "$BUILD/bin/whoami"
fi

echo "whoami binary: $BUILD/bin/whoami"
echo "hello binary: $BUILD/bin/hello"
