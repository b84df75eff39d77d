# Build the Windows installer: bundle (PyInstaller), self-test of the bundle, setup.exe (Inno Setup 6).
#
#   powershell -ExecutionPolicy Bypass -File packaging\windows\build.ps1
#
# Needs Python 3.11+ (py launcher) and Inno Setup 6 (iscc.exe on PATH or in its default folder).
# $env:TORCH_INDEX_URL picks the torch build: https://download.pytorch.org/whl/cpu (the default here)
# for a small CPU-only installer, or e.g. https://download.pytorch.org/whl/cu128 for NVIDIA GPUs.
# Output: build\dist\frankenmoe-studio\ and build\dist\FrankenMoE-Studio-<version>-windows-x64-setup.exe
$ErrorActionPreference = "Stop"
$Root = Resolve-Path (Join-Path $PSScriptRoot "..\..")
Set-Location $Root

$Venv = if ($env:VENV) { $env:VENV } else { "build\venv-package" }
$Torch = if ($env:TORCH) { $env:TORCH } else { "torch==2.13.0" }
$TorchIndex = if ($env:TORCH_INDEX_URL) { $env:TORCH_INDEX_URL } else { "https://download.pytorch.org/whl/cpu" }
$Python = Join-Path $Venv "Scripts\python.exe"

if (-not (Test-Path $Python)) { py -3 -m venv $Venv }
& $Python -m pip install --quiet --upgrade pip
& $Python -m pip install --quiet $Torch --index-url $TorchIndex
& $Python -m pip install --quiet -e . "pyinstaller==6.22.3"
$Version = & $Python -c "import app; print(app.__version__)"

& $Python -m PyInstaller --noconfirm --distpath build\dist --workpath build\pyinstaller packaging\frankenmoe.spec
if ($LASTEXITCODE -ne 0) { throw "PyInstaller failed" }

# The console executable, so that the self-test's report shows in this window.
$env:QT_QPA_PLATFORM = "offscreen"
& "build\dist\frankenmoe-studio\frankenmoe.exe" --self-test
if ($LASTEXITCODE -ne 0) { throw "the bundle's self-test failed" }
Remove-Item Env:\QT_QPA_PLATFORM

$Iscc = (Get-Command iscc.exe -ErrorAction SilentlyContinue).Source
if (-not $Iscc) { $Iscc = Join-Path ${env:ProgramFiles(x86)} "Inno Setup 6\ISCC.exe" }
& $Iscc "/DAppVersion=$Version" packaging\windows\frankenmoe.iss
if ($LASTEXITCODE -ne 0) { throw "Inno Setup failed" }
Get-ChildItem build\dist\*.exe | ForEach-Object { "{0}  {1:N0} MB" -f $_.Name, ($_.Length / 1MB) }
