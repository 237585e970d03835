#!/usr/bin/env bash
# Installs what sluice needs to build, run and test on Debian 12. Idempotent: packages
# already present are not reinstalled, and apt is only contacted when something is missing.
set -euo pipefail

pkgs=(build-essential cmake pkg-config
      libuv1-dev libluajit2-5.1-dev luajit2 libwslay-dev libssl-dev node-llhttp
      lua-busted lua-cjson curl python3 python3-websockets prometheus)
# Node.js and npm (the `ws` client in the WebSocket tests) may come with the machine image;
# install Debian's only when missing.
command -v npm >/dev/null 2>&1 || pkgs+=(nodejs npm)
if [ "${1:-}" = "--bench" ]; then
  pkgs+=(wrk nginx-light haproxy valgrind)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
