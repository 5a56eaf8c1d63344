"""fusedopt: fused single-pass optimizer kernels for PyTorch, over flat parameter buffers.

Swap `torch.optim.AdamW(...)` for `fusedopt.AdamW(...)`: same arguments, same trajectory, one pass over memory.
"""
from . import optim
from ._backend import build_info, set_num_threads
from ._version import __version__
from .clip import clip_grad_norm_, clip_grad_value_
from .optim import *  # noqa: F403  (every optimizer class, listed once in optim.__all__)
from .optim.sam import SAM  # wraps the optimizers above; not one of them, so outside optim.__all__

__all__ = ["__version__", "build_info", "clip_grad_norm_", "clip_grad_value_", "set_num_threads", "SAM",
           *optim.__all__]
