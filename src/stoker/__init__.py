"""stoker keeps the GPU fed: DataLoaders sized to the real CPU budget, for diffusion fine-tuning data.

The public API lives here; everything else is private to the package.
"""

from __future__ import annotations

import logging

from stoker.cache import CacheReport, cache_latents, cache_text_encoder_outputs, check_caches
from stoker.data.dataset import DatasetReport, StokerDataset, load_dataset, to_float_images
from stoker.errors import (
    CacheError,
    ConfigError,
    DatasetError,
    LoaderTimeout,
    Problem,
    SharedMemoryFull,
    StokerError,
    StokerWarning,
    WorkerFailed,
)
from stoker.loader import StokerLoader, make_loader, plan_loader, tune_loader
from stoker.monitor import InputMonitor, LoaderStats
from stoker.plan import Adjustment, LoaderPlan, LoaderRequest, MeasuredChoice, Measurement
from stoker.system.cpu import Budget, Limit, cpu_budget
from stoker.tune import TuneResult
from stoker.version import __version__

# A library logs; the application decides where logs go (warnings already reach the user).
logging.getLogger("stoker").addHandler(logging.NullHandler())

__all__ = [
    "Adjustment",
    "Budget",
    "CacheError",
    "CacheReport",
    "ConfigError",
    "DatasetError",
    "DatasetReport",
    "InputMonitor",
    "Limit",
    "LoaderPlan",
    "LoaderRequest",
    "LoaderStats",
    "LoaderTimeout",
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
    "cache_latents",
    "cache_text_encoder_outputs",
    "check_caches",
    "cpu_budget",
    "load_dataset",
    "make_loader",
    "plan_loader",
    "to_float_images",
    "tune_loader",
]
