#!/usr/bin/env bash
# Build FrankenMoE Studio for Linux from this checkout: the one-folder bundle (PyInstaller), a
# tarball of it to run without installing, and a .deb built with dpkg-deb.
#
#   bash packaging/linux/build.sh
#
# Environment (all optional):
#   PYTHON           Python 3.11+ for the build environment (python3)
#   VENV             build environment, created if missing and reused (build/venv-package)
#   TORCH            the torch requirement to bundle (torch==2.13.0)
#   TORCH_INDEX_URL  where to get it: https://download.pytorch.org/whl/cpu for a CPU build (about
#                    a third of the size), .../cu128 or PyPI's default for an NVIDIA GPU build;
#                    empty uses pip's configured index
#   FRANKENMOE_SLIM  0 keeps what the spec would leave out (to measure the saving)
#   DEB_COMPRESSION  dpkg-deb's -Z: xz (smallest, default), zstd or gzip (faster)
# Output in build/dist/: frankenmoe-studio/, frankenmoe-studio-VERSION-linux-ARCH.tar.gz and
# frankenmoe-studio_VERSION_ARCH.deb. Takes 7 to 14 minutes on two cores (see README).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-build/venv-package}
TORCH=${TORCH:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
DEB_COMPRESSION=${DEB_COMPRESSION:-xz}
PACKAGE=frankenmoe-studio
DIST=build/dist
BUNDLE=$DIST/$PACKAGE

step() { printf '\n== %s (%ds)\n' "$1" "$SECONDS"; }

step "build environment: $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
if [ -n "$TORCH_INDEX_URL" ]; then
    "$VENV/bin/python" -m pip install --quiet "$TORCH" --index-url "$TORCH_INDEX_URL"
else
    "$VENV/bin/python" -m pip install --quiet "$TORCH"
fi
"$VENV/bin/python" -m pip install --quiet -e . "pyinstaller==6.22.3"
VERSION=$("$VENV/bin/python" -c 'import app; print(app.__version__)')
ARCH=$(dpkg --print-architecture 2>/dev/null || uname -m)

step "bundle: PyInstaller"
rm -rf "$BUNDLE"
"$VENV/bin/pyinstaller" --noconfirm --log-level WARN --distpath "$DIST" --workpath build/pyinstaller \
    packaging/frankenmoe.spec

step "self-test of the bundle"
# In a throw-away home: the frozen app writes its log under ~/.local/state.
SELF_TEST_HOME=$(mktemp -d)
HOME=$SELF_TEST_HOME XDG_STATE_HOME="" QT_QPA_PLATFORM=offscreen "$BUNDLE/frankenmoe" --self-test
rm -rf "$SELF_TEST_HOME"

step "tarball"
TARBALL=$DIST/$PACKAGE-$VERSION-linux-$(uname -m).tar.gz
# The desktop entry and icon travel with it for users who want a menu entry without the package.
cp packaging/linux/frankenmoe-studio.desktop resources/icons/frankenmoe-256.png "$BUNDLE/"
tar -C "$DIST" -czf "$TARBALL" "$PACKAGE"
rm "$BUNDLE/frankenmoe-studio.desktop" "$BUNDLE/frankenmoe-256.png"

step "Debian package"
STAGE=build/deb/$PACKAGE
rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN" "$STAGE/opt" "$STAGE/usr/bin" "$STAGE/usr/share/applications"
cp -a "$BUNDLE" "$STAGE/opt/$PACKAGE"
ln -s "/opt/$PACKAGE/frankenmoe" "$STAGE/usr/bin/frankenmoe"
install -m 644 packaging/linux/frankenmoe-studio.desktop "$STAGE/usr/share/applications/"
for png in resources/icons/frankenmoe-*.png; do
    size=${png##*-}
    size=${size%.png}
    install -D -m 644 "$png" "$STAGE/usr/share/icons/hicolor/${size}x${size}/apps/$PACKAGE.png"
done
install -D -m 644 resources/icons/frankenmoe.svg "$STAGE/usr/share/icons/hicolor/scalable/apps/$PACKAGE.svg"
# The newest glibc symbol version any bundled program or library asks for: the package's real minimum.
# (objdump fails on the odd non-ELF file, such as an executable script; those have no say.)
GLIBC=$({ find "$STAGE/opt" -type f \( -name '*.so*' -o -perm -u+x \) -exec objdump -T {} + 2>/dev/null || true; } \
    | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@GLIBC@/${GLIBC:-2.28}/" \
    -e "s/@INSTALLED_SIZE@/$(du -sk "$STAGE" | cut -f1)/" packaging/linux/control.in >"$STAGE/DEBIAN/control"
DEB=$DIST/${PACKAGE}_${VERSION}_${ARCH}.deb
# Icons and the menu entry need no maintainer scripts: the icon theme's and desktop-file-utils'
# dpkg triggers refresh their caches.
dpkg-deb --root-owner-group -Z"$DEB_COMPRESSION" --build "$STAGE" "$DEB"
rm -rf "$STAGE"

step "done"
du -sh "$BUNDLE" "$TARBALL" "$DEB"
