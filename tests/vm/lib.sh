# shellcheck shell=bash
# Shared helpers for tests/vm/run and tests/vm/fetch-kernel.  Sourced, not executed.
#
# Cache layout (${UBLK_VM_CACHE:-$HOME/.cache/ublk-runner/vm}):
#   kernel/<kver>/            dpkg -x of linux-image-<kver>-unsigned, depmod'ed
#   kernel/<kver>/.pkgversion Debian package version it came from (written last: marks it complete)
#   initramfs/base-<hash>.cpio  static busybox + /init + decompressed 9p/overlay modules
#   .lock                     flock(1) serialising downloads and rebuilds

VM_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
VM_CACHE=${UBLK_VM_CACHE:-${HOME:-$(cd ~ && pwd)}/.cache/ublk-runner/vm}
# Upstream version glob of the Debian kernel to use: "6.12.*" (newest available) or e.g. "6.12.107".
VM_KERNEL_GLOB=${UBLK_VM_KERNEL:-6.12.*}
VM_FLAVOUR=+deb12-amd64
VM_BASE_MODULES="9pnet_virtio 9p overlay"

vm_die() { echo "tests/vm: $*" >&2; exit 125; }

vm_lock() {  # run "$@" while holding the cache lock
    mkdir -p "$VM_CACHE" || vm_die "cannot create cache dir $VM_CACHE"
    (
        flock 9 || exit 125
        "$@"
    ) 9>"$VM_CACHE/.lock"
}

# Convert the version glob into an extended regex on package names.
_vm_pkg_regex() {
    local g=$VM_KERNEL_GLOB
    g=${g//./\\.}; g=${g//\*/[0-9.]*}; g=${g//\+/\\+}
    printf '^linux-image-%s\\+deb12-amd64-unsigned$' "$g"
}

# Print "<package> <version>" of the newest downloadable kernel matching the glob.
vm_newest_available() {
    local re pkg ver best="" bestver="" pkgs
    re=$(_vm_pkg_regex)
    mapfile -t pkgs < <(apt-cache pkgnames linux-image-6 2>/dev/null | grep -E "$re")
    [ "${#pkgs[@]}" -gt 0 ] || return 1
    # madison lists only versions that a configured source can deliver
    while read -r pkg ver; do
        [ -n "$ver" ] || continue
        if [ -z "$bestver" ] || dpkg --compare-versions "$ver" gt "$bestver"; then
            best=$pkg bestver=$ver
        fi
    done < <(apt-cache madison "${pkgs[@]}" 2>/dev/null | awk -F' *[|] *' '{gsub(/ /, "", $1); print $1, $2}')
    [ -n "$best" ] || return 1
    echo "$best $bestver"
}

# Print the kver (e.g. 6.12.107+deb12-amd64) of the newest complete cached kernel matching the glob.
vm_newest_cached() {
    local d k best=""
    for d in "$VM_CACHE"/kernel/*/.pkgversion; do
        [ -e "$d" ] || continue
        k=$(basename -- "$(dirname -- "$d")")
        # shellcheck disable=SC2053
        [[ $k == $VM_KERNEL_GLOB$VM_FLAVOUR ]] || continue
        if [ -z "$best" ] || dpkg --compare-versions "$k" gt "$best"; then best=$k; fi
    done
    [ -n "$best" ] || return 1
    echo "$best"
}

# Download + unpack + depmod one package (caller holds the lock).  $1=package $2=version
_vm_install_kernel() {
    local pkg=$1 ver=$2 kver tmp deb
    kver=${pkg#linux-image-}; kver=${kver%-unsigned}
    if [ -f "$VM_CACHE/kernel/$kver/.pkgversion" ] &&
       [ "$(cat "$VM_CACHE/kernel/$kver/.pkgversion")" = "$ver" ]; then
        return 0
    fi
    echo "tests/vm: downloading $pkg $ver (~110 MB) into $VM_CACHE" >&2
    mkdir -p "$VM_CACHE/kernel"
    tmp=$(mktemp -d "$VM_CACHE/kernel/.tmp.XXXXXX") || return 1
    # apt-get download writes into the cwd; as root it warns that _apt cannot access it.
    if ! (cd "$tmp" && apt-get download -q=2 "$pkg=$ver" >/dev/null 2>"$tmp/apt.log"); then
        cat "$tmp/apt.log" >&2; rm -rf "$tmp"; return 1
    fi
    deb=$(echo "$tmp"/*.deb)
    mkdir "$tmp/root"
    dpkg -x "$deb" "$tmp/root" && depmod -b "$tmp/root" "$kver" &&
        [ -f "$tmp/root/boot/vmlinuz-$kver" ] && [ -f "$tmp/root/lib/modules/$kver/modules.dep" ] ||
        { echo "tests/vm: unpacking $deb failed" >&2; rm -rf "$tmp"; return 1; }
    echo "$ver" >"$tmp/root/.pkgversion.new"
    rm -rf "$VM_CACHE/kernel/$kver"
    mv "$tmp/root" "$VM_CACHE/kernel/$kver"
    mv "$VM_CACHE/kernel/$kver/.pkgversion.new" "$VM_CACHE/kernel/$kver/.pkgversion"
    rm -rf "$tmp"
}

_vm_fetch_locked() {
    local pv
    pv=$(vm_newest_available) ||
        { echo "tests/vm: no linux-image-${VM_KERNEL_GLOB}${VM_FLAVOUR}-unsigned in apt (run apt-get update?)" >&2
          return 1; }
    # shellcheck disable=SC2086
    _vm_install_kernel $pv
}

# Make sure the newest available kernel is cached (network).  Used by fetch-kernel / CI.
vm_fetch_kernel() { vm_lock _vm_fetch_locked; }

# kver to boot: newest cached one, fetching only when none is cached (no apt query per run).
vm_kernel_for_run() {
    local k
    if ! k=$(vm_newest_cached); then
        vm_fetch_kernel || return 1
        k=$(vm_newest_cached) || return 1
    fi
    echo "$k"
}

_vm_build_base_locked() {  # $1=kver $2=hash $3=output path
    local kver=$1 out=$3 kdir="$VM_CACHE/kernel/$1" tmp f name m
    [ -f "$out" ] && return 0
    tmp=$(mktemp -d "$VM_CACHE/initramfs/.tmp.XXXXXX") || return 1
    mkdir -p "$tmp/root"/{bin,dev,proc,sys,mnt/lower,mnt/rw,newroot,lib/ublk-vm}
    cp /bin/busybox "$tmp/root/bin/busybox"
    cp "$VM_DIR/init" "$tmp/root/init"
    chmod 755 "$tmp/root/init"
    : >"$tmp/root/lib/ublk-vm/modules"
    # insmod lines in dependency order, duplicates dropped
    for m in $VM_BASE_MODULES; do
        modprobe -d "$kdir" -S "$kver" --show-depends "$m" || { rm -rf "$tmp"; return 1; }
    done | awk '$1=="insmod" && !seen[$2]++ {print $2}' | while read -r f; do
        name=$(basename -- "$f"); name=${name%.xz}; name=${name%.zst}; name=${name%.gz}
        case $f in
            *.xz) xz -dc "$f" ;;
            *.zst) zstd -dc "$f" ;;
            *.gz) gzip -dc "$f" ;;
            *) cat "$f" ;;
        esac >"$tmp/root/lib/ublk-vm/$name" || exit 1
        echo "$name" >>"$tmp/root/lib/ublk-vm/modules"
    done || { rm -rf "$tmp"; return 1; }
    (cd "$tmp/root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
        >"$tmp/base.cpio" || { rm -rf "$tmp"; return 1; }
    rm -f "$VM_CACHE/initramfs/base-$kver-"*.cpio   # drop stale ones for this kernel
    mv "$tmp/base.cpio" "$out"
    rm -rf "$tmp"
}

# Print the path of the base initramfs for kver $1, (re)building it when its inputs changed.
vm_base_initramfs() {
    local kver=$1 hash out
    hash=$( { echo "v1 $kver $VM_BASE_MODULES"; cat "$VM_CACHE/kernel/$kver/.pkgversion" \
              "$VM_DIR/init" /bin/busybox; } | sha256sum | cut -c1-16)
    out="$VM_CACHE/initramfs/base-$kver-$hash.cpio"
    if [ ! -f "$out" ]; then
        mkdir -p "$VM_CACHE/initramfs"
        vm_lock _vm_build_base_locked "$kver" "$hash" "$out" ||
            { echo "tests/vm: building the base initramfs failed" >&2; return 1; }
    fi
    echo "$out"
}

# PVH boot: qemu can enter an uncompressed vmlinux directly at its PVH entry point (CONFIG_PVH=y),
# which skips the bzImage decompressor; under TCG that saves ~2 CPU-seconds per boot.
# The vmlinux is the bzImage payload: (setup_sects+1)*512 + payload_offset, payload_length bytes,
# the last 4 of which are the uncompressed size appended by the kernel build.
_vm_extract_vmlinux() {  # $1=bzImage $2=output (caller holds the lock)
    local setup off len start magic dec
    [ -f "$2" ] && return 0   # done by a concurrent run
    setup=$(od -An -tu1 -j $((0x1f1)) -N1 "$1" | tr -d ' ')
    [ "$setup" = 0 ] && setup=4
    off=$(od -An -tu4 -j $((0x248)) -N4 "$1" | tr -d ' ')
    len=$(od -An -tu4 -j $((0x24c)) -N4 "$1" | tr -d ' ')
    [ -n "$off" ] && [ -n "$len" ] && [ "$len" -gt 4 ] || return 1
    start=$(( (setup + 1) * 512 + off ))
    # dd, not tail|head: the callers run with pipefail, and tail would die of SIGPIPE.
    magic=$(dd if="$1" iflag=skip_bytes,count_bytes skip="$start" count=6 status=none | od -An -tx1 | tr -d ' \n')
    case $magic in
        28b52ffd*) dec="zstd -dcq" ;;
        fd377a585a00) dec="xz -dcq" ;;
        1f8b*) dec="gzip -dcq" ;;
        *) return 1 ;;
    esac
    command -v "${dec%% *}" >/dev/null || return 1
    # shellcheck disable=SC2086
    dd if="$1" iflag=skip_bytes,count_bytes skip="$start" count=$((len - 4)) bs=1M status=none |
        $dec >"$2.tmp" &&
        [ "$(head -c 4 "$2.tmp" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] &&
        mv "$2.tmp" "$2" || { rm -f "$2.tmp"; return 1; }
}

# Print the image to pass to qemu -kernel: the PVH vmlinux when possible, else the bzImage.
vm_boot_image() {
    local kver=$1 kdir="$VM_CACHE/kernel/$1" pvh
    pvh="$kdir/boot/vmlinux-$kver.pvh"
    if [ "${UBLK_VM_PVH:-1}" != 0 ] && grep -qx 'CONFIG_PVH=y' "$kdir/boot/config-$kver" 2>/dev/null; then
        [ -f "$pvh" ] || vm_lock _vm_extract_vmlinux "$kdir/boot/vmlinuz-$kver" "$pvh" 2>/dev/null || true
        if [ -f "$pvh" ]; then echo "$pvh"; return 0; fi
    fi
    echo "$kdir/boot/vmlinuz-$kver"
}
