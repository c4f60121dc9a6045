"""The dataset protocol: StokerDataset implements it, a renamed member breaks it loudly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stoker
from stoker.data.protocol import BatchingDataset, ResumableBatchSampler
from stoker.data.synthetic import write_sample_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    sample = write_sample_dataset(tmp_path_factory.mktemp("protocol"))
    return stoker.load_dataset(sample.config)


def test_stoker_dataset_and_its_sampler_implement_the_protocol(dataset):
    assert isinstance(dataset, BatchingDataset)
    assert isinstance(dataset.with_seed(3), BatchingDataset)
    sampler = dataset.make_batch_sampler(seed=0)
    assert isinstance(sampler, ResumableBatchSampler)
    batch = next(iter(sampler))
    paths = dataset.sample_paths(batch)
    assert len(paths) == len(batch) and all(p.endswith((".png", ".jpg", ".webp")) for p in paths)
    assert dataset.batch_sizes_in_use() == sorted({int(b) for b in dataset.batch_sizes})


def _minimal_dataset(**renamed: str) -> object:
    """An object with every member of the protocol, with the named ones renamed."""
    members = {
        "seed": 0,
        "output": "float",
        "fast_decode": True,
        "decode_problems": [],
        "collate_fn": lambda batch: batch,
        "__len__": lambda self: 0,
        "with_seed": lambda self, seed: self,
        "make_batch_sampler": lambda self, **kw: None,
        "batch_sizes_in_use": lambda self: [1],
        "fingerprint": lambda self: "x",
        "sample_paths": lambda self, batch: [],
        "for_workers": lambda self: self,
        "arrive": lambda self, batch: batch,
    }
    for old, new in renamed.items():
        members[new] = members.pop(old)
    return type("Minimal", (), members)()


@pytest.mark.parametrize(
    "member",
    ["seed", "collate_fn", "make_batch_sampler", "fingerprint", "sample_paths", "arrive"],
)
def test_a_renamed_member_is_no_longer_a_batching_dataset(member):
    assert isinstance(_minimal_dataset(), BatchingDataset)
    assert not isinstance(_minimal_dataset(**{member: member + "_v2"}), BatchingDataset)


def test_fingerprint_is_stable_and_sees_a_setting_change(dataset):
    assert dataset.fingerprint() == dataset.with_seed(9).fingerprint()  # the seed is not a speed
    other = dataset.with_seed(0)
    other.output = "uint8"
    assert other.fingerprint() != dataset.fingerprint()


def test_a_plain_map_dataset_is_loaded_by_dataloader_itself():
    class Plain(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> np.int64:
            return np.int64(i)

    assert not isinstance(Plain(), BatchingDataset)
    loader = stoker.make_loader(Plain(), batch_size=4, shuffle=True, seed=1, workers=0)
    seen = sorted(int(x) for batch in loader for x in batch)
    assert seen == list(range(10))
    with pytest.raises(TypeError, match="ResumableBatchSampler"):
        loader.state_dict()
