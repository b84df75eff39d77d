#!/usr/bin/env bash
# End-to-end check of the Linux package: build it from a clean checkout of HEAD, install it, run the
# installed copy's self-test offscreen (and, installed into the system with xvfb-run at hand, on
# X11 as well), and report the time taken and the sizes.
#
#   bash packaging/linux/check.sh            # installs into a scratch root (dpkg-deb -x), no root needed
#   bash packaging/linux/check.sh --system   # installs into this system with apt (root; for CI machines)
#
# The build environment is reused between runs (VENV, default build/venv-package of this checkout),
# so only the first run downloads torch. Other variables are passed on to build.sh. KEEP=1 keeps
# the work folder. 8 to 15 minutes on two cores (see README).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MODE=scratch
if [ "${1:-}" = "--system" ]; then
    MODE=system
fi
export VENV=${VENV:-$ROOT/build/venv-package}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/frankenmoe-check.XXXXXX")
if [ "${KEEP:-0}" != 1 ]; then
    trap 'rm -rf "$WORK"' EXIT
fi

echo "== clean checkout of $(git -C "$ROOT" rev-parse --short HEAD) in $WORK/src"
mkdir -p "$WORK/src"
git -C "$ROOT" archive HEAD | tar -x -C "$WORK/src"

bash "$WORK/src/packaging/linux/build.sh"
BUILD_SECONDS=$SECONDS
DEB=$(ls "$WORK"/src/build/dist/frankenmoe-studio_*.deb)
TARBALL=$(ls "$WORK"/src/build/dist/frankenmoe-studio-*.tar.gz)

echo "== install ($MODE)"
if [ "$MODE" = system ]; then
    apt-get update -qq
    apt-get install -y -qq "$DEB" >/dev/null
    PREFIX=""
    EXE=$(command -v frankenmoe)
else
    PREFIX=$WORK/root
    dpkg-deb -x "$DEB" "$PREFIX"
    # /usr/bin/frankenmoe is an absolute link into /opt; follow it inside the scratch root.
    EXE=$PREFIX$(readlink "$PREFIX/usr/bin/frankenmoe")
fi
test -x "$EXE"
if command -v desktop-file-validate >/dev/null; then
    desktop-file-validate "$PREFIX/usr/share/applications/frankenmoe-studio.desktop"
fi
test -f "$PREFIX/usr/share/icons/hicolor/256x256/apps/frankenmoe-studio.png"

# Libraries the bundle expects from the system; after an apt install every one must be there.
MISSING=$(find "$PREFIX/opt/frankenmoe-studio" -name '*.so*' -type f -exec ldd {} + 2>/dev/null \
    | grep 'not found' | sort -u || true)
if [ -n "$MISSING" ]; then
    echo "system libraries not found:"
    echo "$MISSING"
    if [ "$MODE" = system ]; then
        exit 1
    fi
fi

echo "== self-test of the installed copy: $EXE"
# A fresh home, so that the check neither reads nor writes the user's settings, caches and logs.
mkdir -p "$WORK/home"
HOME=$WORK/home XDG_CACHE_HOME="" XDG_STATE_HOME="" QT_QPA_PLATFORM=offscreen "$EXE" --version
HOME=$WORK/home XDG_CACHE_HOME="" XDG_STATE_HOME="" QT_QPA_PLATFORM=offscreen "$EXE" --self-test
if [ "$MODE" = system ] && command -v xvfb-run >/dev/null; then
    echo "== self-test on X11 (Xvfb): Qt's xcb plugin with the libraries the package depends on"
    HOME=$WORK/home XDG_CACHE_HOME="" XDG_STATE_HOME="" xvfb-run -a env QT_QPA_PLATFORM=xcb "$EXE" --self-test
fi

echo "== report"
echo "build: ${BUILD_SECONDS} s, build and check: ${SECONDS} s"
echo "installed bundle: $(du -sh "$PREFIX/opt/frankenmoe-studio" | cut -f1)"
echo "tarball: $(du -h "$TARBALL" | cut -f1)  $(basename "$TARBALL")"
echo "deb: $(du -h "$DEB" | cut -f1)  $(basename "$DEB")"
if [ "$MODE" = system ]; then
    apt-get remove -y -qq frankenmoe-studio >/dev/null
fi
