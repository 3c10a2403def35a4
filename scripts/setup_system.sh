#!/usr/bin/env bash
# Install the system packages SAPIEN (ManiSkill's engine) needs: a Vulkan device that offers
# VK_KHR_external_semaphore_fd. Idempotent: does nothing when a usable Vulkan device exists.
#
# CPU-only Debian 12: Mesa 22.3 lavapipe lacks the extension; Mesa >= 24.3 from bookworm-backports
# has it. NVIDIA machines: the driver's ICD already provides it, nothing is installed.
set -euo pipefail

log() { echo "[offrl setup] $*"; }

have_good_vulkan() {
  # A lavapipe ICD from Mesa >= 24.3, or any NVIDIA ICD, is enough.
  if ls /usr/share/vulkan/icd.d/nvidia_icd*.json /etc/vulkan/icd.d/nvidia_icd*.json >/dev/null 2>&1; then
    return 0
  fi
  if command -v dpkg-query >/dev/null 2>&1; then
    local v
    v=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)
    if [ -n "$v" ] && dpkg --compare-versions "$v" ge 24.3 \
       && dpkg-query -W -f='${Status}' libvulkan1 2>/dev/null | grep -q "ok installed"; then
      return 0
    fi
  fi
  return 1
}

if have_good_vulkan; then
  log "Vulkan device present (NVIDIA driver or Mesa >= 24.3 lavapipe); nothing to install."
  exit 0
fi

if [ ! -r /etc/os-release ]; then
  log "cannot identify this distribution (/etc/os-release missing)."
  log "Install a Vulkan driver offering VK_KHR_external_semaphore_fd (Mesa >= 24.3 lavapipe or an NVIDIA driver) by hand."
  exit 0
fi
. /etc/os-release
if [ "${ID:-}" != "debian" ] || [ "${VERSION_CODENAME:-}" != "bookworm" ]; then
  log "this script automates Debian 12 (bookworm) only; found ${PRETTY_NAME:-unknown}."
  log "Install a Vulkan driver offering VK_KHR_external_semaphore_fd (Mesa >= 24.3 lavapipe, or an NVIDIA driver) and libvulkan1 with your package manager."
  exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    log "need root (or sudo) to install mesa-vulkan-drivers from bookworm-backports."; exit 1
  fi
fi

list=/etc/apt/sources.list.d/offrl-bookworm-backports.list
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "enabling bookworm-backports in $list"
  echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee "$list" >/dev/null
fi
log "installing mesa-vulkan-drivers and libvulkan1 from bookworm-backports"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
log "done: $(dpkg-query -W -f='mesa-vulkan-drivers ${Version}' mesa-vulkan-drivers)"
