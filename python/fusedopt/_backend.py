"""Backend dispatch: picks "cuda", "cpu" or "reference" for a buffer set and reports what was built.

The compiled extension is optional at import time: when it is missing or fails to load, every optimizer
runs on the reference backend after one warning that keeps the original error.
"""
from __future__ import annotations

import os
import platform
import warnings
from types import ModuleType
from typing import Any

import torch

from ._version import __version__

BACKENDS = ("auto", "cpu", "cuda", "reference")

_compiled: ModuleType | None
_load_error: BaseException | None
try:
    from . import _kernels as _compiled  # noqa: F401  (imports fusedopt._C)
    _load_error = None
except ValueError:
    raise  # an unusable FUSEDOPT_CPU_ISA is the user's explicit request: say so instead of running slower code
except Exception as error:  # any failure to load the extension must leave `import fusedopt` working
    _compiled = None
    _load_error = error

_warned_fallback = False


def compiled() -> ModuleType | None:
    """The module that wraps the compiled kernels, or None when the extension did not load."""
    return _compiled


def load_error() -> BaseException | None:
    return _load_error


def cuda_built() -> bool:
    return _compiled is not None and bool(_compiled.build_info().get("cuda_built", False))


def validate_backend(name: Any, argument: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"Invalid {argument}: {name!r} (expected one of {', '.join(BACKENDS)})")
    return name


def resolve(requested: str, device: torch.device) -> str:
    """The backend that runs buffers on `device` for a group that asked for `requested`.

    FUSEDOPT_BACKEND, when set, overrides the group's choice.
    """
    global _warned_fallback
    override = os.environ.get("FUSEDOPT_BACKEND")
    if override:
        requested = validate_backend(override, "FUSEDOPT_BACKEND")
    validate_backend(requested)
    if requested == "reference":
        return "reference"
    if requested == "auto":
        if _compiled is None:
            if not _warned_fallback:
                warnings.warn(
                    f"fusedopt: the compiled kernels could not be loaded ({_load_error!r}); "
                    "optimizers run on the slower reference backend",
                    RuntimeWarning,
                    stacklevel=4,
                )
                _warned_fallback = True
            return "reference"
        if device.type == "cuda":
            return "cuda" if cuda_built() else "reference"
        return "cpu" if device.type == "cpu" else "reference"
    # An explicit request for a compiled backend must not silently run something else.
    if _compiled is None:
        raise RuntimeError(
            f"fusedopt: backend {requested!r} was requested but the compiled extension failed to load: "
            f"{_load_error!r}"
        )
    if requested == "cuda" and not cuda_built():
        raise RuntimeError("fusedopt: backend 'cuda' was requested but this build has no CUDA kernels")
    if device.type != requested:
        raise ValueError(f"fusedopt: backend {requested!r} cannot update parameters on device {device}")
    return requested


def build_info() -> dict[str, Any]:
    """What this installation can run: version, backends, CPU instruction set, CUDA, and any load error."""
    info: dict[str, Any] = {
        "version": __version__,
        "torch": torch.__version__,
        "platform": platform.machine(),
        "backends": ["reference"],
        "cpu_isa": None,
        "cpu_isas_supported": [],
        "cuda_built": False,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "load_error": None if _load_error is None else repr(_load_error),
    }
    if _compiled is not None:
        native = _compiled.build_info()
        info["compiled"] = native
        info["backends"] = ["cpu", "reference"] + (["cuda"] if native.get("cuda_built") else [])
        info["cpu_isa"] = _compiled.cpu_isa()
        info["cpu_isas_supported"] = list(_compiled.supported_isas())
        info["cuda_built"] = bool(native.get("cuda_built", False))
    return info


def set_num_threads(n: int | None) -> None:
    """Fix the number of threads of the CPU kernels, or with None let them follow `torch.get_num_threads()` (the
    default, so `torch.set_num_threads` applies to fusedopt too). The kernels run on the OpenMP runtime torch loaded,
    or on fusedopt's own thread pool where there is none (docs/cpu_kernels.md, Threads). A process forked while no
    step runs keeps the count: it runs on a pool of its own."""
    if _compiled is None:
        return
    if n is None:
        _compiled.reset_num_threads()
    else:
        _compiled.set_num_threads(int(n))
