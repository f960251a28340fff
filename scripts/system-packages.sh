#!/usr/bin/env bash
# Debian packages the test suite talks to for real: an MQTT broker, promtool, a PulseAudio
# server with a null sink (a microphone without a sound card), PortAudio for sounddevice, and
# systemd-nspawn + debootstrap to run the systemd unit in a booted Debian container
# (tests/service/test_systemd.py; systemd-analyze comes with systemd itself), and Chromium with
# its WebDriver for the review page's browser test (tests/web/test_browser.py).
set -euo pipefail
packages=(mosquitto mosquitto-clients prometheus pulseaudio pulseaudio-utils libasound2-plugins libportaudio2 sox
          systemd systemd-container debootstrap chromium chromium-driver)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
