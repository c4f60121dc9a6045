"""stoker keeps the GPU fed: DataLoaders sized to the real CPU budget, for diffusion fine-tuning data.

The public API lives here; everything else is private to the package.
"""

from __future__ import annotations

import logging

from stoker.budget import Budget, Limit, cpu_budget
from stoker.data.catalog import Problem
from stoker.data.dataset import DatasetReport, StokerDataset, load_dataset, to_float_images
from stoker.errors import (
    CacheError,
    ConfigError,
    DatasetError,
    InputBoundWarning,
    SharedMemoryFull,
    StokerError,
    StokerWarning,
    WorkerFailed,
)
from stoker.loader import StokerLoader, make_loader, plan_loader
from stoker.monitor import InputMonitor, LoaderStats
from stoker.plan import Adjustment, LoaderPlan, LoaderRequest, MeasuredChoice, Measurement
from stoker.tune import TuneResult, tune_loader

__version__ = "0.1.0"

# A library logs; the application decides where logs go (warnings already reach the user).
logging.getLogger("stoker").addHandler(logging.NullHandler())

__all__ = [
    "Adjustment",
    "Budget",
    "CacheError",
    "ConfigError",
    "DatasetError",
    "DatasetReport",
    "InputBoundWarning",
    "InputMonitor",
    "Limit",
    "LoaderPlan",
    "LoaderRequest",
    "LoaderStats",
    "MeasuredChoice",
    "Measurement",
    "Problem",
    "SharedMemoryFull",
    "StokerDataset",
    "StokerError",
    "StokerLoader",
    "StokerWarning",
    "TuneResult",
    "WorkerFailed",
    "__version__",
    "cpu_budget",
    "load_dataset",
    "make_loader",
    "plan_loader",
    "to_float_images",
    "tune_loader",
]
