#!/usr/bin/env bash
# System packages guardx's extras need, from Debian/Ubuntu's apt. Idempotent: installs only what is missing.
# Needs root or sudo.
#   (default)  OpenCV 4, libjpeg-turbo and pkg-config: FFCV builds against them and loads them at run time
#   --browser  also Chromium and ChromeDriver: the test that opens report.html in a headless browser (CI)
set -euo pipefail
packages=()
if ! { command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg 2>/dev/null; }; then
  packages+=(libturbojpeg0-dev libopencv-dev pkg-config)
fi
if [ "${1:-}" = "--browser" ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  packages+=(chromium chromium-driver)
fi
[ ${#packages[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "install_system_deps.sh: no apt-get here; install ${packages[*]} (or your system's equivalents)" \
       "with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
