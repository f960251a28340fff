#!/usr/bin/env bash
# Debian packages the test suite talks to for real: an MQTT broker, promtool, a PulseAudio
# server with a null sink (a microphone without a sound card), PortAudio for sounddevice.
set -euo pipefail
packages=(mosquitto mosquitto-clients prometheus pulseaudio pulseaudio-utils libasound2-plugins libportaudio2 sox)
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
