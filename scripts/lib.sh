# Shared helpers for the test steps (sourced, not run).
# Each installs what is missing and fails loudly when it cannot.

# need_apt PKG...: installs Debian packages that are not installed (needs root).
need_apt() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
    return 1
  fi
  echo "installing: ${missing[*]}"
  if [ -z "${SAGE_APT_UPDATED:-}" ]; then
    apt-get update -qq || { echo "error: apt-get update failed" >&2; return 1; }
    export SAGE_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || { echo "error: apt-get install ${missing[*]} failed" >&2; return 1; }
}

# need_target TRIPLE...: adds rust targets that are not installed.
need_target() {
  for t in "$@"; do
    rustup target list --installed | grep -qx "$t" || rustup target add "$t" \
      || { echo "error: rustup target add $t failed" >&2; return 1; }
  done
}

# need_component NAME...: adds rustup components (clippy, rustfmt) that are missing.
need_component() {
  for c in "$@"; do
    rustup component list --installed | grep -q "^$c" || rustup component add "$c" \
      || { echo "error: rustup component add $c failed" >&2; return 1; }
  done
}
