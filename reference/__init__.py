"""The repository's old home of the PyTorch references, kept so that ``import reference`` and
``from reference.absorbed import ...`` still work from a checkout. They live in ``mla_kernels.reference`` (which a
``pip install`` ships); these names are that package and its modules, the same objects."""

import sys

from mla_kernels import reference as _home
from mla_kernels.reference import *  # noqa: F401,F403
from mla_kernels.reference import __all__, absorbed, naive, quant  # noqa: F401

for _name in ("absorbed", "naive", "quant"):  # ``import reference.naive`` finds the package's module, not a copy
    sys.modules[f"{__name__}.{_name}"] = getattr(_home, _name)
