from __future__ import annotations

import stoker

EXPECTED = [
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


def test_public_api_is_exactly_this():
    assert stoker.__all__ == EXPECTED
    assert sorted(stoker.__all__) == stoker.__all__
    for name in stoker.__all__:
        assert hasattr(stoker, name), name
