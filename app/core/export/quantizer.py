"""K-quants through llama.cpp's own `llama-quantize`, run on an f16/bf16/f32 GGUF the export wrote first."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from app.core.problems import FrankenMoEError
from app.core.progress import Cancelled, Progress

QUANTIZE_EXECUTABLE = "llama-quantize"
# llama-quantize's type names for the types the gguf package cannot write itself, with their bits per weight
# (llama.cpp's figures for a 7B Llama), for the size estimate.
QUANTIZER_BITS = {
    "q2_k": 2.96,
    "q3_k_s": 3.50,
    "q3_k_m": 3.91,
    "q3_k_l": 4.27,
    "q4_k_s": 4.58,
    "q4_k_m": 4.89,
    "q5_k_s": 5.54,
    "q5_k_m": 5.70,
    "q6_k": 6.56,
    "iq4_nl": 4.50,
    "iq4_xs": 4.25,
}
QUANTIZER_TYPES = tuple(QUANTIZER_BITS)


def find_llama_quantize(configured: str | None = None) -> Path | None:
    """The configured llama-quantize (a file, or a folder holding one), else the one on PATH, else None."""
    if configured:
        path = Path(os.path.expanduser(configured))
        if path.is_dir():
            path = path / QUANTIZE_EXECUTABLE
        return path if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which(QUANTIZE_EXECUTABLE)
    return Path(found) if found else None


def quantize_command(quantizer: Path, source: Path, target: Path, out_type: str, threads: int) -> list[str]:
    """llama-quantize's command line: SOURCE TARGET TYPE THREADS."""
    return [str(quantizer), str(source), str(target), out_type.upper(), str(threads)]


def run_quantizer(
    quantizer: Path, source: Path, target: Path, out_type: str, cancel: threading.Event | None
) -> Iterator[Progress]:
    """Run llama-quantize, yielding a heartbeat; killed on cancel. Raises FrankenMoEError with its last output."""
    command = quantize_command(quantizer, source, target, out_type, max(1, os.cpu_count() or 1))
    log = target.with_name(target.name + ".log")
    try:
        with log.open("wb") as output:
            try:
                process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            except OSError as exc:
                raise FrankenMoEError(
                    f"cannot run {quantizer}: {exc}", "point --quantize-with at llama.cpp's llama-quantize executable"
                ) from exc
            yield Progress("quantize", 0, 1, message=f"llama-quantize {out_type}")
            try:
                while process.poll() is None:
                    if cancel is not None and cancel.is_set():
                        process.kill()
                        process.wait()
                        raise Cancelled("cancelled")
                    time.sleep(0.1)
                    # A heartbeat without a message: a GUI's loop gets a turn to cancel, a CLI prints nothing.
                    yield Progress("quantize", 0, 1)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        if process.returncode != 0 or not target.is_file():
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            raise FrankenMoEError(
                f"llama-quantize failed (exit code {process.returncode}): {' / '.join(tail) or 'no output'}",
                "check that it is a llama-quantize from a llama.cpp recent enough for this architecture, "
                "or export an in-process type (f16, q8_0)",
            )
    finally:
        log.unlink(missing_ok=True)
