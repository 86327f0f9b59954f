#!/usr/bin/env bash
# System libraries FFCV builds against and loads at run time (OpenCV 4, libjpeg-turbo, pkg-config).
# Idempotent: does nothing when they are present. Needs root or sudo.
set -euo pipefail
if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libturbojpeg0-dev libopencv-dev pkg-config >/dev/null
