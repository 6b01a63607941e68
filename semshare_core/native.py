"""Building the project's small C kernels (``csrc/*.c``) at first use.

A kernel is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``) into
``<cache>/native/`` (:func:`semshare_core.models.default_cache_dir`), keyed by its source,
the compiler, the flags and the CPU, so a replica builds it once (seconds) and later
starts load it. Concurrent builders each compile to a temporary file and rename it last.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

CSRC = Path(__file__).resolve().parent / "csrc"


@functools.lru_cache(maxsize=None)
def cpuinfo(field: str) -> str:
    """The first ``field`` line of ``/proc/cpuinfo`` (its value), or ""."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    return set(cpuinfo("flags").split())


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor()


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def compiler() -> Optional[str]:
    """The C compiler's path (``$CC``, ``cc`` or ``gcc``), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library_path(cc: str, source: Path, flags: Sequence[str], stem: str) -> Path:
    from .models import default_cache_dir

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([Path(source).read_bytes(), version.encode(), " ".join(flags).encode(),
                                     cpu_model().encode(), " ".join(sorted(cpu_flags())).encode()])).hexdigest()
    return default_cache_dir() / "native" / f"{stem}-{key[:16]}.so"


def build_library(cc: str, source: Path, flags: Sequence[str], stem: str) -> Path:
    """Compile ``source`` into a shared library (unless already cached); returns its path.
    Raises RuntimeError with the compiler's message when it fails (nothing is left behind)."""
    path = library_path(cc, source, flags, stem)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)  # replicas may build at once: rename last
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, "-o", tmp, str(source), "-lm"], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
