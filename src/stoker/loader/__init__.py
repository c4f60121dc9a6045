"""The loader: build a DataLoader from a plan (``build``), explain its failures (``failures``), and
``make_loader`` on top (``make``), which plans and measures first.
"""

from stoker.loader.build import StokerLoader, WorkerInit, build_loader
from stoker.loader.make import make_loader, tune_loader
from stoker.planning import plan_loader

__all__ = [
    "StokerLoader",
    "WorkerInit",
    "build_loader",
    "make_loader",
    "plan_loader",
    "tune_loader",
]
