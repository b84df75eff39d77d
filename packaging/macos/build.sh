#!/usr/bin/env bash
# Build the macOS app and disk image: FrankenMoE Studio.app (PyInstaller), its self-test, and a .dmg.
#
#   bash packaging/macos/build.sh
#
# Runs on macOS 12+ with Python 3.11+ (python.org or Homebrew); builds for the machine's own
# architecture (arm64 on Apple silicon, where torch uses the GPU through MPS). Uses only the
# system's tools: iconutil for the icon, codesign for an ad-hoc signature, hdiutil for the image.
# Without a Developer ID signature and notarisation, Gatekeeper asks users to confirm the first
# start (Control-click, Open); set CODESIGN_IDENTITY to sign with a real identity.
# Output: build/dist/FrankenMoE Studio.app and build/dist/FrankenMoE-Studio-<version>-macos-<arch>.dmg
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-build/venv-package}
TORCH=${TORCH:-torch==2.13.0}
APP_NAME="FrankenMoE Studio"
ARCH=$(uname -m)

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# PyPI's macOS torch wheels are the CPU + MPS build: no CUDA libraries to leave out.
"$VENV/bin/python" -m pip install --quiet "$TORCH"
"$VENV/bin/python" -m pip install --quiet -e . "pyinstaller==6.22.3"
VERSION=$("$VENV/bin/python" -c 'import app; print(app.__version__)')

# The spec takes the icon from build/frankenmoe.icns; iconutil wants the PNGs under these names.
ICONSET=build/frankenmoe.iconset
rm -rf "$ICONSET" && mkdir -p "$ICONSET"
for size in 16 32 128 256 512; do
    cp "resources/icons/frankenmoe-$size.png" "$ICONSET/icon_${size}x${size}.png"
done
for size in 16 128 256; do
    cp "resources/icons/frankenmoe-$((size * 2)).png" "$ICONSET/icon_${size}x${size}@2x.png"
done
cp resources/icons/frankenmoe-64.png "$ICONSET/icon_32x32@2x.png"
iconutil --convert icns --output build/frankenmoe.icns "$ICONSET"

"$VENV/bin/pyinstaller" --noconfirm --distpath build/dist --workpath build/pyinstaller packaging/frankenmoe.spec
APP="build/dist/$APP_NAME.app"
codesign --force --deep --sign "${CODESIGN_IDENTITY:--}" "$APP"

QT_QPA_PLATFORM=offscreen "$APP/Contents/MacOS/frankenmoe" --self-test

# The image opens as a window with the app and a link to /Applications to drag it onto.
DMG="build/dist/FrankenMoE-Studio-$VERSION-macos-$ARCH.dmg"
STAGE=build/dmg
rm -rf "$STAGE" "$DMG" && mkdir -p "$STAGE"
cp -R "$APP" "$STAGE/"
ln -s /Applications "$STAGE/Applications"
hdiutil create -volname "$APP_NAME" -srcfolder "$STAGE" -fs HFS+ -format UDZO -ov "$DMG"
du -sh "$APP" "$DMG"
