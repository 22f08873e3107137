#!/usr/bin/env bash
# Builds kubetune's container images with buildah (no Docker engine) and writes each as a
# docker-archive into a cache outside the repository, ${KUBETUNE_IMAGES_DIR:-~/.cache/kubetune/images}:
#
#   base     a Debian bookworm root filesystem (debootstrap --variant=minbase) with python3.11,
#            python3.11-venv and ca-certificates (plus the host's extra CAs), imported with
#            `buildah from scratch`: the local stand-in for the public bases the Dockerfiles name.
#   pause    a from-scratch image holding Debian's busybox-static (containerd's sandbox_image).
#   operator Dockerfile.operator with BASE_IMAGE=the local base.
#   trainer  Dockerfile.trainer with BASE_IMAGE=the local base.
#
# Cached by content: each image's tag is a hash of its inputs (the Dockerfile, pyproject.toml,
# README.md, .dockerignore, every file under kubetune/, and the base's hash; the base's hash
# covers its suite, packages, mirror and the host's extra CAs). An image whose archive exists
# is skipped. Buildah keeps its layers (--layers) and pip its cache (RUN --mount=type=cache), so
# a source-only change reruns only the layers after `COPY kubetune`.
#
# Usage:
#   tools/images.sh [NAME...]        build what is missing (default: pause operator trainer);
#                                    logs on stderr, a summary (size, build time) at the end
#   tools/images.sh --print-archives build what is missing, then print NAME=ARCHIVE lines
#   tools/images.sh --print-refs     print NAME=REFERENCE lines (localhost/kubetune/NAME:HASH),
#                                    building nothing
#   tools/images.sh --stored NAME    load NAME's archive into this script's buildah storage if it
#                                    is not there, print its reference
#   tools/images.sh buildah ARGS...  buildah with this script's storage (e.g. `buildah images`)
#   tools/images.sh --clean          remove the archives and buildah's storage of this script
#
# Needs root, buildah and debootstrap (Debian: apt-get install buildah debootstrap
# busybox-static). The RUN steps use the host's network (PyPI and the Debian mirror only).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"

CACHE="${KUBETUNE_IMAGES_DIR:-$HOME/.cache/kubetune/images}"
# buildah's own storage, apart from the default one so that other users of buildah or podman on
# the machine neither see nor remove these layers. Overlay: measured to work here (ext4).
STORAGE_ROOT="${KUBETUNE_BUILDAH_ROOT:-$HOME/.cache/kubetune/buildah/storage}"
STORAGE_RUNROOT="${KUBETUNE_BUILDAH_RUNROOT:-/run/kubetune-buildah}"
STORAGE_DRIVER="${KUBETUNE_BUILDAH_DRIVER:-overlay}"
REF_PREFIX="localhost/kubetune"

BASE_SUITE=bookworm
BASE_PACKAGES="python3.11 python3.11-venv ca-certificates"
# Bump when the way the base or the pause image is made changes (their hash covers it).
BASE_RECIPE=1
PAUSE_RECIPE=1

log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'images: %s\n' "$*" >&2; exit 1; }

bah() {
  buildah --root "$STORAGE_ROOT" --runroot "$STORAGE_RUNROOT" --storage-driver "$STORAGE_DRIVER" "$@"
}

require() {
  local missing=()
  [ "$(id -u)" = 0 ] || die "needs root (buildah with overlay storage and debootstrap run as root here)"
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ -x /bin/busybox ] && file_is_static /bin/busybox || missing+=(busybox-static)
  if [ ${#missing[@]} -gt 0 ]; then
    die "missing: ${missing[*]}; install them with: apt-get install -y buildah debootstrap busybox-static"
  fi
}

file_is_static() { ! ldd "$1" >/dev/null 2>&1; }

# The Debian mirror the host's apt uses (its first URI), so that no mirror is named here.
host_mirror() {
  local uri=""
  if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
    uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources)"
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri="$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)"
  fi
  [ -n "$uri" ] || die "found no Debian mirror in /etc/apt/sources.list{,.d/*.sources}"
  echo "$uri"
}

extra_cas() { find /usr/local/share/ca-certificates -type f -name '*.crt' 2>/dev/null | LC_ALL=C sort; }

hash16() { sha256sum | cut -c1-16; }

base_hash() {
  {
    echo "recipe=$BASE_RECIPE suite=$BASE_SUITE packages=$BASE_PACKAGES mirror=$(host_mirror)"
    local ca
    for ca in $(extra_cas); do echo "ca $(basename "$ca")"; cat "$ca"; done
  } | hash16
}

pause_hash() {
  { echo "recipe=$PAUSE_RECIPE"; dpkg-query -W -f='${Version}' busybox-static 2>/dev/null \
      || sha256sum /bin/busybox 2>/dev/null || echo "no busybox"; } | hash16
}

# Everything the Dockerfile's COPY steps read (.dockerignore: pyproject.toml, README.md,
# kubetune/ without __pycache__), the Dockerfile itself and the base.
app_hash() {
  local dockerfile="$1"
  {
    echo "base=$(base_hash)"
    cd "$repo"
    sha256sum "$dockerfile" .dockerignore pyproject.toml README.md
    find kubetune -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | hash16
}

image_hash() {
  case "$1" in
    base) base_hash ;;
    pause) pause_hash ;;
    operator) app_hash Dockerfile.operator ;;
    trainer) app_hash Dockerfile.trainer ;;
    *) die "unknown image '$1' (base, pause, operator, trainer)" ;;
  esac
}

ref_of() { echo "$REF_PREFIX/$1:$(image_hash "$1")"; }
archive_of() { echo "$CACHE/$1-$(image_hash "$1").tar"; }

# The image is in buildah's storage, loaded from its archive if only the archive is there.
ensure_stored() {
  local name="$1" ref
  ref="$(ref_of "$name")"
  bah inspect --type image "$ref" >/dev/null 2>&1 && return
  log "$name: loading $(archive_of "$name") into buildah's storage"
  bah pull --quiet "docker-archive:$(archive_of "$name")" >/dev/null
}

write_archive() {
  local name="$1" ref archive
  ref="$(ref_of "$name")"; archive="$(archive_of "$name")"
  rm -f "$archive.tmp"
  bah push --quiet "$ref" "docker-archive:$archive.tmp:$ref"
  mv "$archive.tmp" "$archive"
  # Older archives of this image are stale: keep one (the trainer's is several GiB).
  find "$CACHE" -maxdepth 1 -name "$name-*.tar" ! -path "$archive" -delete
  # So are its older tags in buildah's storage: each trainer build copies its whole
  # environment into a new top layer (about 7 GB). The untagged build-cache layers stay,
  # so the next source change still reuses the dependency layer.
  local old
  for old in $(bah images --format '{{.Name}}:{{.Tag}}' | grep "^$REF_PREFIX/$name:" | grep -v "^$ref\$"); do
    bah rmi "$old" >/dev/null 2>&1 || true
  done
}

build_base() {
  local ref="$1" work rootfs ctr mnt ca
  work="$(mktemp -d "$CACHE/work.base.XXXXXX")"; rootfs="$work/rootfs"
  log "base: debootstrap --variant=minbase $BASE_SUITE from the host's mirror, then apt-get install $BASE_PACKAGES"
  debootstrap --variant=minbase "$BASE_SUITE" "$rootfs" "$(host_mirror)" >"$work/build.log" 2>&1 \
    || { tail -20 "$work/build.log" >&2; die "debootstrap failed (log: $work/build.log)"; }
  # apt, not debootstrap --include: debootstrap does not resolve virtual packages
  # (python3.11-venv depends on python3.11-distutils, which python3-distutils provides).
  # shellcheck disable=SC2086
  unshare --mount --fork chroot "$rootfs" sh -c "mount -t proc proc /proc && apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $BASE_PACKAGES" \
    >>"$work/build.log" 2>&1 || { tail -20 "$work/build.log" >&2; die "apt-get install in the base failed (log: $work/build.log)"; }
  # The host's extra CAs (e.g. a TLS-inspecting egress proxy), so that pip reaches PyPI from
  # the build exactly as the host does.
  for ca in $(extra_cas); do cp "$ca" "$rootfs/usr/local/share/ca-certificates/"; done
  chroot "$rootfs" update-ca-certificates >/dev/null
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs/etc/resolv.conf" \
    "$rootfs/etc/hostname" "$rootfs"/var/log/*.log
  ctr="$(bah from --quiet scratch)"
  mnt="$(bah mount "$ctr")"
  cp -a "$rootfs/." "$mnt/"
  bah umount "$ctr" >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /bin/bash \
    --label "org.opencontainers.image.description=kubetune's local base: Debian $BASE_SUITE minbase + $BASE_PACKAGES" "$ctr"
  bah commit --quiet --rm "$ctr" "$ref" >/dev/null
  rm -rf "$work"
}

build_pause() {
  local ref="$1" ctr mnt
  ctr="$(bah from --quiet scratch)"
  mnt="$(bah mount "$ctr")"
  mkdir -p "$mnt/bin"
  cp /bin/busybox "$mnt/bin/busybox"
  bah umount "$ctr" >/dev/null
  # Sleeps until SIGTERM or SIGINT, then exits 0: what a sandbox's pause process needs to do.
  bah config --user 65535:65535 \
    --entrypoint '["/bin/busybox", "sh", "-c", "trap \"exit 0\" TERM INT; while :; do /bin/busybox sleep 3600 & wait $!; done"]' \
    --cmd '' --label "org.opencontainers.image.description=kubetune's pause image (busybox-static)" "$ctr"
  bah commit --quiet --rm "$ctr" "$ref" >/dev/null
}

build_app() {
  local name="$1" ref="$2"
  ensure_stored base
  log "$name: buildah bud -f Dockerfile.$name --build-arg BASE_IMAGE=$(ref_of base)"
  # --network host: the RUN steps reach PyPI and the Debian mirror through the host.
  (cd "$repo" && bah bud --layers --pull-never --network host \
    --build-arg "BASE_IMAGE=$(ref_of base)" \
    -f "Dockerfile.$name" -t "$ref" .) >&2
}

declare -A took
ensure_built() {
  local name="$1" ref archive start
  ref="$(ref_of "$name")"; archive="$(archive_of "$name")"
  if [ -f "$archive" ]; then
    log "$name: up to date ($archive)"
    took[$name]=cached
    return
  fi
  start=$SECONDS
  mkdir -p "$CACHE"
  if ! bah inspect --type image "$ref" >/dev/null 2>&1; then
    case "$name" in
      base) build_base "$ref" ;;
      pause) build_pause "$ref" ;;
      *) build_app "$name" "$ref" ;;
    esac
  fi
  write_archive "$name"
  took[$name]="$((SECONDS - start))s"
  log "$name: built $ref in ${took[$name]}"
}

summary() {
  local name size
  printf '%-9s %-8s %-9s %s\n' image build size reference >&2
  for name in "$@"; do
    size="$(du -h --apparent-size "$(archive_of "$name")" | cut -f1)"
    printf '%-9s %-8s %-9s %s\n' "$name" "${took[$name]:-?}" "$size" "$(ref_of "$name")" >&2
  done
}

clean() {
  bah rm --all >/dev/null 2>&1 || true
  bah rmi --all --force >/dev/null 2>&1 || true
  rm -rf "$CACHE" "$STORAGE_ROOT"
  log "removed $CACHE and $STORAGE_ROOT"
}

main() {
  local names=() print=""
  case "${1:-}" in
    --print-refs)
      for n in pause operator trainer; do echo "$n=$(ref_of "$n")"; done
      return ;;
    --print-archives) print=archives; shift ;;
    --stored)
      # NAME: load its archive into buildah's storage if needed, print its reference.
      [ -f "$(archive_of "${2:?--stored NAME}")" ] || die "no archive for $2: run tools/images.sh $2"
      ensure_stored "$2"; ref_of "$2"
      return ;;
    buildah) shift; bah "$@"; return ;;
    --clean) clean; return ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; return ;;
  esac
  names=("$@")
  [ ${#names[@]} -gt 0 ] || names=(pause operator trainer)
  local n all=() total=$SECONDS
  for n in "${names[@]}"; do
    case "$n" in base|pause|operator|trainer) ;; *) die "unknown image '$n' (base, pause, operator, trainer)" ;; esac
  done
  require
  for n in "${names[@]}"; do
    case "$n" in operator|trainer) [[ " ${all[*]} " == *" base "* ]] || all+=(base) ;; esac
    all+=("$n")
  done
  for n in "${all[@]}"; do ensure_built "$n"; done
  summary "${all[@]}"
  log "done in $((SECONDS - total))s"
  if [ "$print" = archives ]; then
    for n in "${names[@]}"; do echo "$n=$(archive_of "$n")"; done
  fi
}

main "$@"
