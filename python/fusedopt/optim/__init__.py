"""fusedopt's optimizers: torch.optim.Optimizer subclasses that step over flat buffers with fused kernels."""
from ._base import FusedOptimizer
from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .asgd import ASGD
from .lamb import LAMB
from .lion import Lion
from .muon import Muon
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .sgd import SGD

__all__ = ["FusedOptimizer", "Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Lion", "LAMB", "Adamax", "RAdam",
           "Adadelta", "Rprop", "NAdam", "ASGD", "Adafactor", "Muon"]
