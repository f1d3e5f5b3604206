"""DDP shards in which every sample counts once (tsssm.data.sharding), and the reduction over
ranks (tsssm.distributed.global_means) on two real gloo processes."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

from tsssm.data.sharding import EvenShards, MarkRepeats, without_repeats
from tsssm.data.windows import StreamDataset, WindowDataset, list_collate


def windows(n_rows: int, length: int = 4) -> WindowDataset:
    return WindowDataset([np.arange(n_rows * 2, dtype=np.float32).reshape(n_rows, 2)], length, 1)


@pytest.mark.parametrize("n,world", [(37, 2), (36, 2), (10, 3), (2, 3), (1, 2)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_are_distributed_samplers_shards_with_the_repeats_marked(n, world, shuffle):
    ds = windows(n + 3)  # n windows of 4 rows
    assert len(ds) == n
    marked = MarkRepeats(ds)
    seen = []
    for rank in range(world):
        ours = EvenShards(marked, world, rank, shuffle=shuffle, seed=7)
        theirs = DistributedSampler(ds, world, rank, shuffle=shuffle, seed=7)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            drawn = list(ours)
            # the same shard as torch deals (so the same number of steps on every rank)
            assert [k % n for k in drawn] == list(theirs)
            assert len(drawn) == len(ours) == -(-n // world)
            if epoch == 0:
                seen += [k for k in drawn if k < n]
            for k in drawn:
                assert bool(marked[k]["real"]) == (k < n)
                torch.testing.assert_close(marked[k]["y"], ds[k % n]["y"])
    assert sorted(seen) == list(range(n))  # every window exactly once over the ranks


def test_without_repeats_keeps_the_real_samples_of_window_and_stream_batches():
    ds = MarkRepeats(windows(8))  # 5 windows
    batch = DataLoader(ds, batch_size=3, sampler=[0, 6, 2])
    (b,) = list(batch)
    kept, real = without_repeats(b)
    assert real and "real" not in kept and kept["y"].shape == (2, 4, 2)
    torch.testing.assert_close(kept["y"], torch.stack([ds[0]["y"], ds[2]["y"]]))
    (only,) = list(DataLoader(ds, batch_size=2, sampler=[5, 6]))
    whole, real = without_repeats(only)
    assert not real and whole["y"].shape == (2, 4, 2)  # its rank still steps, with weight 0
    plain = {"y": torch.zeros(2, 4, 2)}
    assert without_repeats(plain) == (plain, True)

    arrays = [np.ones((5, 2), np.float32), np.ones((7, 2), np.float32),
              np.ones((5, 2), np.float32)]
    streams = MarkRepeats(StreamDataset(arrays, [(0, 5), (2, 7), (0, 5)]))
    (b,) = list(DataLoader(streams, batch_size=3, sampler=[0, 1, 3 + 2],
                           collate_fn=list_collate))
    kept, real = without_repeats(b)
    assert real and [y.shape for y in kept["y"]] == [(1, 5, 2), (1, 7, 2)]
    assert [m.shape for m in kept["mask"]] == [(1, 5), (1, 7)]
    (b,) = list(DataLoader(streams, batch_size=2, sampler=[3 + 1], collate_fn=list_collate))
    assert without_repeats(b)[1] is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, shards, queue) -> None:
    from tsssm.distributed import global_means

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = []
        for values, weight in shards[rank]:  # one step: this rank's means and weight
            w = torch.tensor(values, dtype=torch.float32, requires_grad=True)
            means, total = global_means({"loss": w[0], "mse": w[1].detach()}, weight)
            means["loss"].backward()
            out.append((means["loss"].item(), means["mse"].item(), total, w.grad[0].item(),
                        means["loss"].detach().numpy().tobytes()))
        queue.put((rank, out))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_global_means_on_two_gloo_ranks_are_weighted_exact_and_equal_on_every_rank():
    rng = np.random.default_rng(0)
    # three steps; in the last, rank 1 holds only repeats: weight 0, its loss computed on them
    # (finite, for the gradient's graph), a metric of nothing NaN
    shards = [
        [([0.8764620423, 1.5], 77800.0), ([0.31, 0.25], 3.0), ([0.5, 0.5], 2.0)],
        [([0.9011, 2.5], 5120.0), ([0.77, 0.75], 1.0), ([0.42, float("nan")], 0.0)],
    ]
    # shards of very different sizes (a long stream and a short one, as on the bundled
    # sample): where the old reduction (share + (mean - share).detach()) rounded the mean
    # differently on each rank, in about 2% of such steps
    for _ in range(300):
        a, b = rng.random(2).astype(np.float32)
        wa, wb = float(rng.integers(1000, 100_000)), float(rng.integers(1, 1000))
        shards[0].append(([float(a), 1.0], wa))
        shards[1].append(([float(b), 1.0], wb))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, shards, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for step, ((va, wa), (vb, wb)) in enumerate(zip(shards[0], shards[1])):
        r0, r1 = results[0][step], results[1][step]
        assert r0[4] == r1[4]  # the loss is the same to the last bit on both ranks
        assert r0[2] == r1[2] == wa + wb
        expected = [(x * wa + (y * wb if wb else 0.0)) / (wa + wb) for x, y in zip(va, vb)]
        assert r0[0] == pytest.approx(expected[0], rel=1e-6)
        assert r0[1] == r1[1] == pytest.approx(expected[1], rel=1e-6)
        # each rank's gradient share; DDP's mean of them is d(global mean)/d(own loss) ...
        assert r0[3] == pytest.approx(2 * wa / (wa + wb), rel=1e-6)
        assert r1[3] == pytest.approx(2 * wb / (wa + wb), rel=1e-6)
