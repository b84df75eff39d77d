"""Application settings kept in QSettings: cache folder, default device and dtype, theme, llama-quantize,
recent files.

The Hub token is deliberately absent: it is stored only by huggingface_hub's own login.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QSettings, QStandardPaths

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "float32")
MAX_RECENT_FILES = 8


def default_cache_dir() -> Path:
    location = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.CacheLocation)
    return Path(location or Path.home() / ".cache" / "frankenmoe")


@dataclass
class AppSettings:
    cache_dir: Path = field(default_factory=default_cache_dir)
    device: str = "auto"
    dtype: str = "auto"
    theme: str = "system"
    # llama.cpp's llama-quantize, for the K-quant GGUF types; empty: looked for on PATH.
    llama_quantize: str = ""
    recent_files: list[Path] = field(default_factory=list)

    @classmethod
    def load(cls) -> AppSettings:
        store = QSettings()
        defaults = cls()
        recent = store.value("recent_files", [], list) or []
        return cls(
            cache_dir=Path(str(store.value("cache_dir", str(defaults.cache_dir)))),
            device=_choice(store.value("device", "auto"), DEVICES),
            dtype=_choice(store.value("dtype", "auto"), DTYPES),
            theme=_choice(store.value("theme", "system"), ("system", "light", "dark")),
            llama_quantize=str(store.value("llama_quantize", "") or ""),
            recent_files=[Path(p) for p in recent if p],
        )

    def save(self) -> None:
        store = QSettings()
        store.setValue("cache_dir", str(self.cache_dir))
        store.setValue("device", self.device)
        store.setValue("dtype", self.dtype)
        store.setValue("theme", self.theme)
        store.setValue("llama_quantize", self.llama_quantize)
        store.setValue("recent_files", [str(p) for p in self.recent_files])
        store.sync()

    def remember(self, path: Path) -> None:
        path = path.resolve()
        self.recent_files = [path, *(p for p in self.recent_files if p != path)][:MAX_RECENT_FILES]
        self.save()

    def forget(self, path: Path) -> None:
        self.recent_files = [p for p in self.recent_files if p != path]
        self.save()

    @property
    def torch_dtype_name(self) -> str | None:
        return None if self.dtype == "auto" else self.dtype

    @property
    def demo_dir(self) -> Path:
        return self.cache_dir / "demo"


def _choice(value: object, allowed: tuple[str, ...]) -> str:
    text = str(value)
    return text if text in allowed else allowed[0]
