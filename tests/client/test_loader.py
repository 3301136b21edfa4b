"""OPDLoader and OPDIterableDataset over HTTP: exactly-once epochs, exact resume, worker order."""

from __future__ import annotations

import itertools
import time

import httpx
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lopd.client.errors import ResumeMismatch
from lopd.client.http import StoreClient
from lopd.client.loader import OPDLoader
from lopd.client.sampler import EpochSampler
from lopd.client.torch_dataset import OPDIterableDataset
from lopd.storage.reader import Store

N_BETA = 37


def _ids(batches) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


@pytest.mark.parametrize(("batch_size", "world_size"), [(1, 1), (4, 1), (5, 2), (8, 3), (37, 1), (6, 4)])
def test_one_epoch_yields_every_sample_exactly_once(served, batch_size, world_size):
    store = Store(served.store.root).open("beta")
    seen = []
    with served.client() as client:
        for rank in range(world_size):
            loader = OPDLoader(client, "beta", batch_size, seed=11, rank=rank, world_size=world_size, prefetch=3)
            batches = list(loader)
            assert len(batches) == len(loader)
            for b in batches:
                # The rows are the requested samples, in the requested order.
                assert b["sample_id"] == store.take(b["index"].numpy())["sample_id"].to_pylist()
                assert b["input_ids"].shape[0] == len(b["index"]) <= batch_size
                seen.extend(b["index"].tolist())
            assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches_consumed"] == 0
    assert sorted(seen) == list(range(N_BETA))


@pytest.mark.parametrize(("batch_size", "cut", "prefetch"), [(4, 0, 4), (4, 3, 4), (5, 7, 2), (3, 12, 0), (6, 5, 8)])
def test_resume_mid_epoch_yields_exactly_the_rest_in_order(served, batch_size, cut, prefetch):
    with served.client() as client:
        full = _ids(OPDLoader(client, "beta", batch_size, seed=5, prefetch=prefetch))
        first = OPDLoader(client, "beta", batch_size, seed=5, prefetch=prefetch)
        it = iter(first)
        head = _ids(itertools.islice(it, cut))
        state = first.state_dict()  # taken while later batches are in flight: they must not count
        it.close()
        assert state["batches_consumed"] == cut % len(first)
        resumed = OPDLoader(client, "beta", batch_size, seed=5, prefetch=prefetch)
        resumed.load_state_dict(state)
        assert head + _ids(resumed) == full


def test_resume_across_epochs_with_endless_loader(served):
    with served.client() as client:
        endless = OPDLoader(client, "beta", 8, seed=2, num_epochs=None, prefetch=4)
        stream = _ids(itertools.islice(iter(endless), 12))  # 5 batches an epoch: into the third epoch
        assert endless.state_dict()["epoch"] == 2 and endless.state_dict()["batches_consumed"] == 2
        sampler = EpochSampler(N_BETA, 8, seed=2)
        expected = [b.tolist() for e in range(3) for b in sampler.epoch_batches(e)][:12]
        assert stream == expected

        first = OPDLoader(client, "beta", 8, seed=2, num_epochs=None)
        it = iter(first)
        _ = list(itertools.islice(it, 7))
        it.close()
        again = OPDLoader(client, "beta", 8, seed=2, num_epochs=None)
        again.load_state_dict(first.state_dict())
        assert _ids(itertools.islice(iter(again), 5)) == expected[7:12]


def test_resume_against_other_content_is_refused(served):
    with served.client() as client:
        alpha = OPDLoader(client, "alpha", 4, seed=1)
        next(iter(alpha))
        beta = OPDLoader(client, "beta", 4, seed=1)
        with pytest.raises(ResumeMismatch, match="content"):
            beta.load_state_dict(alpha.state_dict())


def test_prefetch_runs_ahead_of_the_trainer(served):
    batch_requests = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/batch"):
                batch_requests.append(request)
            return super().handle_request(request)

    client = StoreClient(served.url, transport=Counting())
    loader = OPDLoader(client, "beta", 4, prefetch=3)
    it = iter(loader)
    next(it)
    deadline = time.monotonic() + 10
    while len(batch_requests) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(batch_requests) == 4  # the one handed out plus three ahead
    assert loader.state_dict()["batches_consumed"] == 1
    it.close()


def _dataloader_ids(ds: OPDIterableDataset, workers: int) -> list[list[int]]:
    dl = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context="fork" if workers else None)
    return [b["index"].tolist() for b in dl]


@pytest.mark.slow
@pytest.mark.parametrize(("batch_size", "workers"), [(4, 2), (5, 3)])
def test_dataloader_workers_match_the_single_process_order(served, batch_size, workers):
    ds = OPDIterableDataset(served.client(), "beta", batch_size, seed=9, num_epochs=2)
    single = _dataloader_ids(ds, 0)
    assert sorted(sum(single[: len(ds.sampler)], [])) == list(range(N_BETA))
    assert _dataloader_ids(ds, workers) == single

    # Resume from the state after the 4th batch a worker pool produced.
    dl = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context="fork")
    head = list(itertools.islice(iter(dl), 4))
    state = ds.state_dict_after(head[-1])
    fresh = OPDIterableDataset(served.client(), "beta", batch_size, seed=9, num_epochs=2)
    fresh.load_state_dict(state)
    assert [b["index"].tolist() for b in head] + _dataloader_ids(fresh, workers) == single


def test_batches_are_collated_tensors(served):
    with served.client() as client:
        b = next(iter(OPDLoader(client, "alpha", 6, seed=0)))
    assert b["input_ids"].dtype == torch.int64 and b["teacher_logprobs"].dtype == torch.float32
    assert b["response_mask"].sum() == b["response_lengths"].sum()
    assert (b["epoch"], b["batch_index"]) == (0, 0)


def test_numpy_batches_equal_the_torch_batches(served):
    """`arrays="numpy"` (what a base install without torch gets) holds what the tensors hold, same dtypes."""
    with served.client() as client:
        tensors = list(OPDLoader(client, "beta", 5, seed=3, prefetch=2))
        arrays = list(OPDLoader(client, "beta", 5, seed=3, prefetch=2, arrays="numpy"))
    assert len(arrays) == len(tensors) == 8
    for a, t in zip(arrays, tensors):
        assert a.keys() == t.keys()
        for key, value in t.items():
            if isinstance(value, torch.Tensor):
                assert isinstance(a[key], np.ndarray) and a[key].dtype == value.numpy().dtype, key
                np.testing.assert_array_equal(a[key], value.numpy())
            else:
                assert a[key] == value, key


def test_arrays_and_pin_memory_are_checked(served):
    with served.client() as client:
        with pytest.raises(ValueError, match="arrays is 'jax'"):
            OPDLoader(client, "beta", 5, arrays="jax")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="pin_memory pins torch tensors"):
            OPDLoader(client, "beta", 5, arrays="numpy", pin_memory=True)
