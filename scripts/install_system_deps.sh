#!/usr/bin/env bash
# System libraries FFCV builds against and loads at run time (OpenCV 4, libjpeg-turbo, pkg-config).
# Idempotent: does nothing when they are present. Needs root or sudo, and apt (Debian/Ubuntu).
set -euo pipefail
if command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_system_deps.sh: no apt-get here; install OpenCV 4 and libjpeg-turbo development packages" \
       "and pkg-config with your package manager (needed by guardx[ffcv])" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libturbojpeg0-dev libopencv-dev pkg-config >/dev/null
