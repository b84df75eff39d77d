; Inno Setup 6 script: a per-user installer for the one-folder build of FrankenMoE Studio.
;
; Build on Windows (see packaging/windows/build.ps1, which runs all of this):
;   pyinstaller --noconfirm --distpath build\dist --workpath build\pyinstaller packaging\frankenmoe.spec
;   iscc /DAppVersion=0.1.0 packaging\windows\frankenmoe.iss
; Output: build\dist\FrankenMoE-Studio-<version>-windows-x64-setup.exe
;
; Paths are relative to this file (SourcePath). No administrator rights are needed: it installs
; into the user's programs folder unless the user picks "install for all users". The command line
; is {app}\frankenmoe.exe (a console program); the Start menu entry runs the windowed one.
; A CUDA build's bundle is several GB: if iscc reports the setup as too large, add DiskSpanning=yes.

#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#define AppName "FrankenMoE Studio"
#define BundleDir "..\..\build\dist\frankenmoe-studio"
#define GuiExe "FrankenMoE Studio.exe"

[Setup]
; Never change AppId: Windows uses it to find the installed copy for upgrades and uninstalling.
AppId={{6C0F8E36-4B57-4E55-9A3C-2B7F5B1E9D41}
AppName={#AppName}
AppVersion={#AppVersion}
AppPublisher=FrankenMoE Studio contributors
DefaultDirName={autopf}\{#AppName}
DefaultGroupName={#AppName}
DisableProgramGroupPage=yes
PrivilegesRequired=lowest
PrivilegesRequiredOverridesAllowed=dialog
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
OutputDir=..\..\build\dist
OutputBaseFilename=FrankenMoE-Studio-{#AppVersion}-windows-x64-setup
SetupIconFile=..\..\resources\icons\frankenmoe.ico
UninstallDisplayIcon={app}\{#GuiExe}
Compression=lzma2/max
SolidCompression=yes
WizardStyle=modern

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked

[Files]
Source: "{#BundleDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{autoprograms}\{#AppName}"; Filename: "{app}\{#GuiExe}"
Name: "{autodesktop}\{#AppName}"; Filename: "{app}\{#GuiExe}"; Tasks: desktopicon

[Run]
Filename: "{app}\{#GuiExe}"; Description: "{cm:LaunchProgram,{#AppName}}"; Flags: nowait postinstall skipifsilent

