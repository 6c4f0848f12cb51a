"""Native CPU kernels: C sources shipped with llmarch, compiled on first use for the machine that runs them.

A kernel library lives next to this file as ``NAME.c`` (``gemv.c``: the few-row products of
:mod:`llmarch.native.fp32` and :mod:`llmarch.native.int8`; ``w8a8.c``: :mod:`llmarch.native.w8a8`; ``rows.c``:
:mod:`llmarch.native.rows`; ``plain.c``: :mod:`llmarch.native.plain`; ``flash.c``: :mod:`llmarch.native.flash`).
:func:`library` compiles it once with the system's C compiler (``$CC``, else ``cc``) at ``-O3 -march=native
-fopenmp -ffp-contract=off`` (no multiply-add contracted unless a kernel asks for it) into llmarch's cache
directory (``$LLMARCH_CACHE``, else ``~/.cache/llmarch``; under ``kernels/``) and loads it with ctypes. The file
name carries a hash of the source, the flags, the compiler's version and the CPU's model and flags, so a cache
shared between machines never hands one CPU a library built for another; the library is written to a temporary
name and renamed into place, so two processes compiling at once cannot leave a torn file. OpenMP resolves to the
``libgomp`` torch has already loaded, so ``torch.set_num_threads`` sets the kernels' threads too.

Every caller keeps a torch path: :func:`library` returns None (and the caller falls back) when
``LLMARCH_NATIVE=0``, on a CPU without the kernel's instruction set (AVX-512F, or AVX2 with FMA), without a
compiler, or when the build fails (a warning names the compiler's first error line and the marker file that
remembers the failure per hash; the build is retried once the marker is a day old, or at once if it is deleted).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
# x86-64 CPU flags each kernel needs, as alternatives: one set must be complete (its source also refuses to
# compile without them, and picks the widest vectors the CPU has)
NEEDS = {"gemv": (("avx512f",), ("avx2", "fma")), "rows": ((),), "decode": (("avx2", "fma"),),
         "plain": (("avx2", "fma"),), "plain_bf16": (("avx512f", "avx512bw", "avx512_bf16"),),
         "w8a8": (("avx2", "fma"),), "flash": (("avx512f",),)}
# sources a kernel library #includes: part of its build's hash
INCLUDES = {"decode": ("gemv.c", "w8a8.c", "rows.c", "vec.c", "exp.c", "ffn.c", "attention.c", "latent.c"),
            "plain": ("tiles.c",), "plain_bf16": ("tiles.c",), "flash": ("tiles.c", "exp.c")}
RETRY_AFTER_S = 24 * 3600  # a failed build is retried once its marker is this old (a transient failure heals)
log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("LLMARCH_NATIVE", "1") != "0"


def _cpu() -> tuple[str, set[str]]:
    """(model and flags as one string, the flag set); empty off Linux."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor(), set()
    model = next((ln for ln in lines if ln.startswith("model name")), "")
    flags = next((ln for ln in lines if ln.startswith("flags")), "")
    return model + flags, set(flags.partition(":")[2].split())


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _build(src: Path, out: Path, cc: str, extra: tuple[str, ...] = ()) -> str | None:
    """Compile ``src`` to ``out`` atomically (``extra``: more compiler flags); None on success, else the
    compiler's first error line."""
    tmp = out.with_name(f"{out.name}.tmp.{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([cc, *FLAGS, *extra, "-o", str(tmp), str(src)], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:  # an unwritable cache, a compiler that hangs
        return str(e)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        errors = [ln for ln in r.stderr.splitlines() if "error" in ln] or r.stderr.splitlines() or ["no output"]
        return errors[0].strip()
    try:
        os.replace(tmp, out)
    except OSError as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=None)
def library(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``NAME.c``, or None when it cannot be used here (see the module docstring)."""
    if not enabled():
        return None
    signature, flags = _cpu()
    missing = min(([f for f in need if f not in flags] for need in NEEDS.get(name, ((),))), key=len)
    if platform.machine().lower() not in ("x86_64", "amd64") or missing:
        log.debug("native %s: not built for this CPU (%s; missing %s)", name, platform.machine(), missing)
        return None
    cc = _compiler()
    if cc is None:
        log.debug("native %s: no C compiler ($CC or cc)", name)
        return None
    src = Path(__file__).with_name(f"{name}.c")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sources = [src.read_text()] + [src.with_name(f).read_text() for f in INCLUDES.get(name, ())]
    key = hashlib.sha256("\0".join([*sources, " ".join(FLAGS), version, signature]).encode()).hexdigest()
    from llmarch.data import default_cache_dir  # imports torch: only when a kernel is wanted

    out = default_cache_dir() / "kernels" / f"{name}-{key[:16]}.so"
    failed = out.with_name(out.name + ".failed")
    try:
        if time.time() - failed.stat().st_mtime < RETRY_AFTER_S:
            return None
    except OSError:  # no marker
        pass
    if not out.exists():
        error = _build(src, out, cc)
        if error is not None:
            log.warning("native %s: could not compile (%s); using torch's kernel instead (retried in a day, or "
                        "now if %s is deleted)", name, error, failed)
            try:
                failed.write_text(error + "\n")
            except OSError:
                pass
            return None
        log.info("native %s: compiled %s", name, out)
    try:
        return ctypes.CDLL(str(out))
    except OSError as e:
        log.warning("native %s: could not load %s (%s); using torch's kernel instead", name, out, e)
        return None


BLOCK = 16  # outputs per block of gemv.c's weight layout


def version(t: torch.Tensor) -> int:
    """``t._version``, the in-place write counter copies made from ``t`` are checked against; -1 for an inference
    tensor (made under ``torch.inference_mode``), which keeps none: in-place writes to one are not seen."""
    return -1 if t.is_inference() else t._version


def block_rows(weight: torch.Tensor) -> torch.Tensor:
    """A weight [N, K] in gemv.c's layout: [ceil(N/16), K, 16], the rows zero-padded to a multiple of 16."""
    import torch  # noqa: F811 (imported here: only when a kernel is used)

    N, K = weight.shape
    w = torch.nn.functional.pad(weight.detach(), (0, 0, 0, -N % BLOCK))
    return w.view(-1, BLOCK, K).transpose(1, 2).contiguous()


class Kernel:
    """One function of a kernel library, loaded on first use: ``symbol`` of :func:`library` ``(name)``, taking
    ``argtypes`` (ctypes) and returning ``restype`` (None: nothing). ``check(fn)`` runs once first and compares it
    with torch: a function that fails it is never used (a warning says so). :meth:`fn` is None where it cannot be
    used."""

    def __init__(self, name: str, symbol: str, argtypes: list, check: Callable[[Callable], bool], restype=None):
        self.name, self.symbol, self.argtypes, self.check, self.restype = name, symbol, argtypes, check, restype
        self._fn: Callable | None = None
        self._loaded = False

    def fn(self) -> Callable | None:
        if not self._loaded:
            self._fn, self._loaded = self._load(), True
        return self._fn

    def _load(self) -> Callable | None:
        lib = library(self.name)
        if lib is None:
            return None
        fn = getattr(lib, self.symbol, None)  # a function its source builds only for some CPUs may be missing
        if fn is None:
            return None
        fn.argtypes, fn.restype = self.argtypes, self.restype
        if not self.check(fn):
            log.warning("native %s: %s failed its self-check against torch; using torch's kernels instead",
                        self.name, self.symbol)
            return None
        return fn

    def available(self) -> bool:
        return self.fn() is not None

    def reset(self) -> None:
        """Forget the function and the libraries (tests flip ``LLMARCH_NATIVE`` or the cache directory)."""
        self._fn, self._loaded = None, False
        library.cache_clear()


def reset() -> None:
    """Forget loaded libraries (for tests that flip ``LLMARCH_NATIVE`` or the cache directory)."""
    library.cache_clear()
