#!/bin/sh
# System programs the tests use as real peers (producers, a browser), from Debian's packages.
# Run by the README test command. Without root or apt-get it only says what is missing;
# the tests that need a missing program then skip with a reason naming it.
PACKAGES="ffmpeg gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good"
missing=""
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null \
        || { echo "install_test_deps: apt-get install$missing failed" >&2; exit 1; }
else
    echo "install_test_deps: not installed (needs root and apt-get):$missing; the tests that use them will skip" >&2
fi
