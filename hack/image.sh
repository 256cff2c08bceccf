#!/usr/bin/env bash
# Builds the release image from the project's Dockerfile with buildah, on a machine that
# cannot reach a container registry.
#
#   hack/image.sh [TAG]          (default llm-proxy:dev; `just image-local` runs it)
#
# The Dockerfile is used as it is. Only its two base images are made here, under the
# names it pulls, since no registry is reachable:
#   - gcr.io/distroless/cc-debian12:nonroot: glibc and libgcc from this machine's apt
#     sources (apt-get download; Debian 12 here, as the name says), the Mozilla CA bundle from Debian's ca-certificates package,
#     the nonroot user (65532) — what the distroless image carries that our binaries
#     use; no shell.
#   - rust:1.95.0-slim-bookworm: a Debian 12 minbase (debootstrap) with gcc, libc6-dev
#     and ca-certificates, and this machine's Rust 1.95.0 toolchain under
#     /usr/local/cargo, /usr/local/rustup, like the official image. It trusts this
#     machine's CA bundle too, so that cargo reaches crates.io through whatever TLS proxy
#     this machine uses (the build stage only: nothing of it is in the image).
# With Docker and a registry, build the Dockerfile directly instead (README, "Image").
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-llm-proxy:dev}
rust_version=1.95.0
runtime_base=gcr.io/distroless/cc-debian12:nonroot
# Fully qualified: the Dockerfile's short name `rust:…` resolves to Docker Hub's.
build_base=docker.io/library/rust:$rust_version-slim-bookworm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

need() {
  command -v "$1" >/dev/null 2>&1 && return
  echo "image: installing $2..."
  apt-get update -qq && apt-get install -y -qq "$2" >/dev/null
}
need buildah buildah
need debootstrap debootstrap

have_image() { buildah images --quiet "$1" >/dev/null 2>&1; }

if ! have_image "$runtime_base"; then
  echo "image: making $runtime_base from Debian packages..."
  root=$work/runtime
  mkdir -p "$root" "$work/debs"
  (cd "$work/debs" && apt-get download -qq libc6 libgcc-s1 ca-certificates 2>/dev/null)
  for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$root"; done
  mkdir -p "$root/etc/ssl/certs" "$root/home/nonroot" "$root/tmp"
  # What update-ca-certificates would write: the package's certificates, in one file.
  cat "$root"/usr/share/ca-certificates/mozilla/*.crt > "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root/usr/share/doc" "$root/usr/share/lintian" "$root/usr/share/locale" "$root/usr/share/ca-certificates" \
    "$root/usr/sbin" "$root/etc/ca-certificates.conf"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    > "$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$root/etc/group"
  chown 65532:65532 "$root/home/nonroot"
  container=$(buildah from scratch)
  buildah copy --quiet "$container" "$root" / >/dev/null
  buildah config --user 65532:65532 --workingdir /home/nonroot \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$container"
  buildah commit --quiet --rm "$container" "$runtime_base" >/dev/null
fi

if ! have_image "$build_base"; then
  echo "image: making $build_base (debootstrap and this machine's Rust $rust_version; a few minutes)..."
  toolchain=$(rustup which --toolchain "$rust_version" rustc 2>/dev/null || true)
  toolchain=$(dirname "$(dirname "${toolchain:-$HOME/.rustup/toolchains/$rust_version-x86_64-unknown-linux-gnu/bin/rustc}")")
  [[ -x $toolchain/bin/cargo ]] || { echo "image: Rust $rust_version toolchain not found (rustup toolchain install $rust_version)" >&2; exit 1; }
  root=$work/build
  debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates bookworm "$root" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  installed=$root/usr/local/rustup/toolchains/$rust_version-x86_64-unknown-linux-gnu
  mkdir -p "$installed" "$root/usr/local/cargo/bin"
  # The toolchain without its documentation (800 MB of HTML).
  tar -C "$toolchain" --exclude=./share/doc -cf - . | tar -C "$installed" -xf -
  for tool in cargo rustc rustdoc; do
    ln -s "/usr/local/rustup/toolchains/$rust_version-x86_64-unknown-linux-gnu/bin/$tool" "$root/usr/local/cargo/bin/$tool"
  done
  container=$(buildah from scratch)
  buildah copy --quiet "$container" "$root" / >/dev/null
  buildah config --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env RUST_VERSION="$rust_version" "$container"
  buildah commit --quiet --rm "$container" "$build_base" >/dev/null
fi

echo "image: building $tag from the Dockerfile (a release build with LTO: ~3 min after a source change, ~6 cold)..."
# chroot isolation: no OCI runtime, which cannot set up cgroups on this hybrid-cgroup host.
buildah build --quiet --isolation chroot --network host --layers --pull=false -t "$tag" -f Dockerfile . >/dev/null
buildah images "$tag"
