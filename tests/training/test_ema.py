"""EMA of a network (ddil_core/training/ema.py): the fused update equals shadow <- decay * shadow + (1 - decay) * w
per tensor, and integer buffers are copied."""
import torch

from ddil_core.training.ema import EMA


def test_fused_ema_update_matches_the_formula():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # BatchNorm has an int64 buffer
    ema = EMA(net, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net[1].num_batches_tracked += 5
    ema.update(net)
    for k, v in net.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(ema.shadow[k], 0.9 * before[k] + 0.1 * v, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(ema.shadow[k], v)
    assert not torch.equal(ema.shadow["0.weight"], before["0.weight"])
