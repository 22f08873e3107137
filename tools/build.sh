#!/usr/bin/env bash
# Builds the local control plane and tools from their published Go modules into a cache
# outside the repository: ${KUBETUNE_TOOLS_DIR:-~/.cache/kubetune/bin}/<tool>-<version>/.
#
# Idempotent: a tool whose binaries exist and whose wrapper go.mod/go.sum are unchanged
# (a stamp file holds their hash) is skipped. Usage: tools/build.sh [tool ...]
# Tools: etcd kubernetes kwok helm prometheus kueue (default: all).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=/dev/null
source "$here/versions.env"
BIN_ROOT="${KUBETUNE_TOOLS_DIR:-$HOME/.cache/kubetune/bin}"
export GOFLAGS="${GOFLAGS:--buildvcs=false} -trimpath"
mkdir -p "$BIN_ROOT"

log() { printf '[tools %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# build_tool NAME VERSION LDFLAGS PKG=BINARY...
build_tool() {
  local name="$1" version="$2" ldflags="$3"; shift 3
  local dir="$BIN_ROOT/$name-$version" stamp hash missing=0 pair pkg bin start
  hash="$(cat "$here/$name/go.mod" "$here/$name/go.sum" | sha256sum | cut -c1-16)"
  stamp="$dir/.stamp"
  for pair in "$@"; do [ -x "$dir/${pair#*=}" ] || missing=1; done
  [ -z "${AFTER_BUILD:-}" ] || [ -d "$dir/config" ] || missing=1
  if [ "$missing" = 0 ] && [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
    log "$name $version: up to date in $dir"
    return
  fi
  mkdir -p "$dir"
  for pair in "$@"; do
    pkg="${pair%=*}"; bin="${pair#*=}"
    start=$SECONDS
    log "$name $version: building $bin from $pkg ..."
    (cd "$here/$name" && go build -ldflags "-s -w $ldflags" -o "$dir/$bin.tmp" "$pkg")
    mv "$dir/$bin.tmp" "$dir/$bin"
    log "$name $version: $bin built in $((SECONDS - start))s"
  done
  "${AFTER_BUILD:-true}" "$dir"
  echo "$hash" > "$stamp"
}

# Kueue's CRDs and webhook manifests come from the same module source as its binary; the
# cluster fixtures read them next to it (kubetune.devcluster.kueue).
kueue_manifests() {
  local dir="$1" src
  src="$(cd "$here/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
  rm -rf "$dir/config" && mkdir -p "$dir/config"
  cp -r "$src/config/components/crd" "$src/config/components/webhook" "$dir/config/"
  chmod -R u+w "$dir/config"
}

k8s_ldflags() {
  local v="$K8S_VERSION" minor major p
  major="$(echo "${v#v}" | cut -d. -f1)"; minor="$(echo "${v#v}" | cut -d. -f2)"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- '-X %s.gitVersion=%s -X %s.gitMajor=%s -X %s.gitMinor=%s -X %s.gitTreeState=clean -X %s.buildDate=1970-01-01T00:00:00Z ' \
      "$p" "$v" "$p" "$major" "$p" "$minor" "$p" "$p"
  done
}

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(etcd kubernetes kwok helm prometheus kueue)
total_start=$SECONDS
for t in "${tools[@]}"; do
  case "$t" in
    etcd) build_tool etcd "$ETCD_VERSION" "" go.etcd.io/etcd/server/v3=etcd ;;
    kubernetes) build_tool kubernetes "$K8S_VERSION" "$(k8s_ldflags)" \
        k8s.io/kubernetes/cmd/kube-apiserver=kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager=kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler=kube-scheduler \
        k8s.io/kubernetes/cmd/kubectl=kubectl ;;
    kwok) build_tool kwok "$KWOK_VERSION" \
        "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" sigs.k8s.io/kwok/cmd/kwok=kwok ;;
    helm) build_tool helm "$HELM_VERSION" \
        "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
        helm.sh/helm/v3/cmd/helm=helm ;;
    prometheus) build_tool prometheus "$PROMETHEUS_VERSION" \
        "-X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" \
        github.com/prometheus/prometheus/cmd/prometheus=prometheus \
        github.com/prometheus/prometheus/cmd/promtool=promtool ;;
    kueue) AFTER_BUILD=kueue_manifests build_tool kueue "$KUEUE_VERSION" \
        "-X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" sigs.k8s.io/kueue/cmd/kueue=kueue ;;
    *) echo "unknown tool: $t (known: etcd kubernetes kwok helm prometheus kueue)" >&2; exit 2 ;;
  esac
done
log "done in $((SECONDS - total_start))s; cache: $BIN_ROOT ($(du -sh "$BIN_ROOT" | cut -f1))"
