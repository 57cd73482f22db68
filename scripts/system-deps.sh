#!/usr/bin/env bash
# Installs the Debian packages the end-to-end tests use (Slurm, munge, Chromium) when they are missing.
# Needs root; without root it says what to install and continues (those tests then skip).
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: not root; install ${missing[*]} to run the Slurm and browser tests" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
