#!/usr/bin/env bash
# Install the external services the test suite talks to (idempotent).
#   - prometheus-pushgateway (Debian package, binary at /usr/bin/prometheus-pushgateway)
# Safe to run repeatedly: does nothing when the binary is already on PATH.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-services.sh: not root and no sudo; cannot install packages" >&2
        exit 1
    fi
fi

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        $SUDO apt-get update
        APT_UPDATED=1
    fi
}

if command -v prometheus-pushgateway >/dev/null 2>&1; then
    echo "prometheus-pushgateway already installed: $(command -v prometheus-pushgateway)"
else
    apt_update_once
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends prometheus-pushgateway
    # The Debian package enables a system service; tests start their own instance on a free port.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now prometheus-pushgateway >/dev/null 2>&1 || true
    fi
    command -v prometheus-pushgateway >/dev/null 2>&1 || {
        echo "install-services.sh: prometheus-pushgateway still not on PATH after install" >&2
        exit 1
    }
    echo "installed prometheus-pushgateway: $(command -v prometheus-pushgateway)"
fi

# promtool (Debian package prometheus) checks the PromQL of the Grafana dashboard and scrape configs.
if command -v promtool >/dev/null 2>&1; then
    echo "promtool already installed: $(command -v promtool)"
else
    apt_update_once
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends prometheus
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi
