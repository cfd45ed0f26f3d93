#!/usr/bin/env bash
# Installs what the browser tests need; idempotent, and a no-op (about 1 s) when already installed:
#   - Debian's chromium (playwright never downloads a browser here; the network is closed),
#   - playwright-core at the exact version in package.json / package-lock.json.
# Run as root (CI containers) or with sudo available.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ ! -x /usr/lib/chromium/chromium ] && ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
WANT="$(node -p "require('./package.json').dependencies['playwright-core']")"
HAVE="$(node -p "try { require('./node_modules/playwright-core/package.json').version } catch (e) { '' }")"
if [ "$WANT" != "$HAVE" ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
