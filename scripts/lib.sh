# Shared by scripts/demo and scripts/test: installs the Debian packages Certo
# needs when they are missing (as root, or through sudo).

# command-or-file (an absolute path that must exist) → Debian package that provides it.
CERTO_NEEDS=(
  "/usr/lib/postgresql/15/bin/initdb postgresql-15"
  "/usr/lib/postgresql/15/bin/pg_ctl postgresql-15"
  "cc gcc"
  "mmdebstrap mmdebstrap"
  "arch-test arch-test"
  "dnf dnf"
  "createrepo_c createrepo-c"
  "rpmbuild rpm"
  "rpm rpm"
  "mkfs.ext4 e2fsprogs"
  "debugfs e2fsprogs"
  "e2fsck e2fsprogs"
  "qemu-img qemu-utils"
  "dpkg-scanpackages dpkg-dev"
  "apt-ftparchive apt-utils"
  "/bin/busybox busybox-static"
  "zstd zstd"
  "rsync rsync"
  "casync casync"
  "ip iproute2"
  "tc iproute2"
  "nft nftables"
  "ethtool ethtool"
  "xz xz-utils"
  "libvirtd libvirt-daemon-system"
  "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so libvirt-daemon-driver-qemu"
  "virsh libvirt-clients"
  "virt-xml-validate libvirt-clients"
  "xmllint libxml2-utils"
  "/usr/include/libvirt/libvirt.h libvirt-dev"
  "qemu-system-x86_64 qemu-system-x86"
  "/lib/modules linux-image-amd64"
  "chromium chromium"
  "wrk wrk"
  "openssl openssl"
  "python3 python3"
)

# Programs Certo, its tools and its tests run that every Debian system has: each comes
# from an Essential, required or important package (cli/tests/fixtures.rs
# checks that, and that every program the code runs is named here or in CERTO_NEEDS).
# mmdebstrap runs arch-test for foreign architectures; virt-xml-validate runs xmllint.
CERTO_BASE=(bash sh test mkfifo dpkg dpkg-query dpkg-deb mount umount kill tar cp sha256sum id cpio chroot chown chmod setpriv)

certo_install_missing() {
  local need=() entry what pkg
  for entry in "${CERTO_NEEDS[@]}"; do
    what=${entry% *}
    pkg=${entry#* }
    if [[ $what == /* ]]; then
      [ -e "$what" ] && continue
    else
      command -v "$what" >/dev/null && continue
    fi
    [[ " ${need[*]} " == *" $pkg "* ]] || need+=("$pkg")
  done
  if ((${#need[@]})); then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "== installing missing Debian packages: ${need[*]}" >&2
    $sudo apt-get update -qq
    local extra=()
    # qemu-system-x86 must match qemu-utils (one source package): a newer qemu-utils from
    # elsewhere (e.g. backports) blocks it, so pin qemu-utils to qemu-system-x86's version.
    if [[ " ${need[*]} " == *" qemu-system-x86 "* ]]; then
      local want have
      want=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
      have=$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)
      if [ -n "$want" ] && [ -n "$have" ] && [ "$want" != "$have" ]; then
        extra=(--allow-downgrades "qemu-utils=$want")
      fi
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${extra[@]}" "${need[@]}" >&2
  fi
}

# Python tools the tests run, from PyPI, pinned, in a virtual environment of their own
# under target/ (nothing is installed into the system's Python): the OpenAPI validator
# that checks the document `certo serve` publishes, and schemathesis, which sends the
# API requests made from that document and checks the answers against it.
CERTO_PYTOOLS=(openapi-spec-validator==0.9.0 schemathesis==4.32.5)
CERTO_PYTOOLS_DIR=${CERTO_PYTOOLS_DIR:-target/pytools}

certo_install_pytools() {
  local venv=$CERTO_PYTOOLS_DIR
  [ -x "$venv/bin/openapi-spec-validator" ] && [ -x "$venv/bin/schemathesis" ] && return 0
  echo "== installing Python test tools into $venv: ${CERTO_PYTOOLS[*]}" >&2
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >&2; then
    # Debian's python3 makes environments only with python3-venv (ensurepip).
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "${CERTO_PYTOOLS[@]}" >&2
}

# Starts virtlogd and libvirtd (no systemd here) unless they already run; waits until
# libvirtd answers on qemu:///system. Idempotent.
certo_start_libvirtd() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  pgrep -x virtlogd >/dev/null || $sudo virtlogd -d
  pgrep -x libvirtd >/dev/null || $sudo libvirtd -d
  local i
  for i in $(seq 1 50); do
    $sudo virsh -c qemu:///system version >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "libvirtd does not answer on qemu:///system" >&2
  return 1
}
