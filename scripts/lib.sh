# Shared by scripts/demo and scripts/test: installs the Debian packages Certo
# needs when they are missing (as root, or through sudo).

# command-or-file → Debian package that provides it.
CERTO_NEEDS=(
  "/usr/lib/postgresql/15/bin/initdb postgresql-15"
  "cc gcc"
  "mmdebstrap mmdebstrap"
  "dnf dnf"
  "createrepo_c createrepo-c"
  "rpmbuild rpm"
  "mkfs.ext4 e2fsprogs"
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
)

certo_install_missing() {
  local need=() entry what pkg
  for entry in "${CERTO_NEEDS[@]}"; do
    what=${entry% *}
    pkg=${entry#* }
    if [[ $what == /* ]]; then
      [ -x "$what" ] && continue
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
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
  fi
}
