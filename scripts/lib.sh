# Shared by scripts/demo and scripts/test: installs the Debian packages Certo
# needs when they are missing (as root, or through sudo).

certo_install_missing() {
  local need=()
  [ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
  command -v cc >/dev/null || need+=(gcc)
  if ((${#need[@]})); then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "== installing missing Debian packages: ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
  fi
}
