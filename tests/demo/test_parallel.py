"""prepare-demo's data parallelism in threads (ddil_core/demo/parallel.py): the promise is bit-for-bit rebuilds for a
fixed worker count, the plain loop at one worker, the full batch's gradient, and sampled images that do not depend
on the worker count."""
import hashlib
import threading
import time

import pytest
import torch

from ddil_core.demo.parallel import Replicas, map_ordered, shards
from ddil_core.demo.training import train_steps


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))


def _digest(module):
    h = hashlib.sha256()
    for v in module.state_dict().values():
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def _loss_of(model, x, y):
    return (model(x) - y).pow(2).mean()


def _train(workers, steps=5):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)

    def batch_at(step):
        return torch.randn(10, 6, generator=g), torch.randn(10, 3, generator=g)

    info = train_steps("test", model, opt, steps, lambda step: 1e-2, batch_at, _loss_of, (0.9, 0.1),
                       workers=workers)
    return model, info


def test_one_worker_is_the_plain_loop_bit_for_bit():
    model, info = _train(1)
    plain = _model()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(10, 6, generator=g), torch.randn(10, 3, generator=g)
        loss = _loss_of(plain, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
    assert _digest(model) == _digest(plain)
    assert info["workers"] == 1


@pytest.mark.parametrize("workers", [2, 3])
def test_a_fixed_worker_count_rebuilds_the_same_weights(workers):
    (a, info), (b, _) = _train(workers), _train(workers)
    assert _digest(a) == _digest(b) and info["workers"] == workers
    one, _ = _train(1)
    for p, q in zip(a.parameters(), one.parameters()):  # the same optimisation, up to float summation order
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [10, 7])
def test_shard_gradients_add_up_to_the_full_batch_gradient(size):
    """Shards weighted by their size (7 rows over 3 workers: 3, 2, 2) give the batch mean's gradient, and the
    copies hold the module's weights again after they change (as after an optimiser step)."""
    x, y = torch.randn(size, 6), torch.randn(size, 3)
    full = _model()
    expected_loss = _loss_of(full, x, y)
    expected_loss.backward()
    module = _model()
    with Replicas(module, 3) as replicas:
        loss = replicas.backward(_loss_of, (x, y))
        assert loss == pytest.approx(expected_loss.item(), rel=1e-6)
        for p, q in zip(module.parameters(), full.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        assert all(q.grad is None for c in replicas.copies for q in c.parameters())
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1.0)
        for copy in replicas.copies:
            assert _digest(copy) == _digest(module)


def test_shards_cut_in_order_and_skip_empty_ones():
    x = torch.arange(5)
    assert [s[0].tolist() for s in shards((x,), 2)] == [[0, 1, 2], [3, 4]]
    assert len(shards((torch.arange(2),), 3)) == 2  # fewer rows than workers: no empty shard


def test_map_ordered_keeps_order_and_holds_each_resource_alone():
    held, lock, overlaps = set(), threading.Lock(), []

    def work(resource, item):
        with lock:
            overlaps.append(resource in held)
            held.add(resource)
        time.sleep(0.01 * (item % 3))
        with lock:
            held.discard(resource)
        return item * 10

    assert list(map_ordered(work, range(9), 2, ["a", "b"])) == [i * 10 for i in range(9)]
    assert not any(overlaps)
    assert list(map_ordered(lambda i: i + 1, range(4), 1)) == [1, 2, 3, 4]


def test_workers_need_a_fixed_thread_count(tmp_path, capsys):
    from ddil_core.cli import main

    code = main(["prepare-demo", "--out", str(tmp_path / "d"), "--set", "demo.adapt_threads=true",
                 "--set", "demo.workers=2"])
    assert code == 2
    assert "demo.adapt_threads = true needs demo.workers = 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
