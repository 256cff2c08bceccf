#!/usr/bin/env bash
# Builds the image the node test and the node demo run the quickstart's workload in:
# examples/quickstart/30-workload.yaml names python:3.12-slim, which no registry here
# serves. This is the local stand-in: Debian 12's python3 (a debootstrap minbase) with
# the official openai SDK and pip, copied from the venv hack/setup.sh makes (same Python
# 3.11, same machine: no network needed for pip), and no EXTERNALLY-MANAGED marker, as in
# the python images. The workload's own `pip install openai` then finds it installed.
#
#   hack/workload-image.sh      prints the image's name; builds it once (~2 min)
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${LLMPROXY_CACHE:-$HOME/.cache/llm-proxy}
venv=$cache/venv
openai_version=$("$venv/bin/python" -c 'import openai; print(openai.__version__)' 2>/dev/null) ||
  { echo "workload-image: $venv has no openai SDK: run hack/setup.sh" >&2; exit 1; }
image=localhost/llmproxy/python-openai:$openai_version

if buildah images --quiet "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
echo "workload-image: making $image (debootstrap python3, the openai SDK from $venv)..." >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
debootstrap --variant=minbase --include=python3 bookworm "$root" http://deb.debian.org/debian \
  >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/locale
python=$(basename "$(readlink -f "$root/usr/bin/python3")")
[[ $python == python3.11 ]] || { echo "workload-image: the image has $python, the venv python3.11" >&2; exit 1; }
site=$root/usr/local/lib/python3.11/dist-packages
mkdir -p "$site" "$root/usr/local/bin"
cp -a "$venv"/lib/python3.11/site-packages/. "$site/"
rm -f "$root/usr/lib/python3.11/EXTERNALLY-MANAGED"
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
printf '#!/bin/sh\nexec python3 -m pip "$@"\n' >"$root/usr/local/bin/pip"
chmod 755 "$root/usr/local/bin/pip"
container=$(buildah from scratch)
buildah copy --quiet "$container" "$root" / >/dev/null
buildah config --env PATH=/usr/local/bin:/usr/bin:/bin --env PYTHONDONTWRITEBYTECODE=1 \
  --env PIP_DISABLE_PIP_VERSION_CHECK=1 --cmd python3 "$container"
buildah commit --quiet --rm "$container" "$image" >/dev/null
echo "$image"
