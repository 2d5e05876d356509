"""The merge methods, one module each: `many` (LPM, the paper's), and the baselines it is
compared with, `average`, `task_arithmetic` and `ties`. Each module's METHOD is registered here,
in the order `--method` lists them: adding a method is its module and its name in that line."""

from many_cli.methods import average, many, task_arithmetic, ties
from many_cli.methods.registry import REGISTRY, MergeMethod, ignored, readers, register

for _module in (many, average, task_arithmetic, ties):
    register(_module.METHOD)

__all__ = ["REGISTRY", "MergeMethod", "ignored", "readers", "register"]
