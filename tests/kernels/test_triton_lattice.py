"""The lattice ports' Triton loops (one lane per row) equal their torch loops bit for bit.

Compiled on a GPU, under TRITON_INTERPRET=1 on CPUs. The torch loops are themselves checked against
``ggml_quantize_chunk``'s bytes in ``test_ref_iqgrid.py`` / ``test_ref_iq1.py``; on CUDA those tests run
the ports through these kernels.
"""

import pytest
import torch

from tests._require import require

CUDA = torch.cuda.is_available()
require("triton")

from dq.kernels import _triton_lattice as tk  # noqa: E402
from dq.kernels import ref_quant  # noqa: E402
from dq.kernels.ref_iq1 import _split_search, _split_search_m  # noqa: E402
from dq.kernels.ref_iqgrid import _best_neighbour, _make_qp_quants, _tables  # noqa: E402
from dq.quant.formats import QuantFormat  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def _loop_sum(t):
    s = t[..., 0].clone()
    for j in range(1, t.shape[-1]):
        s = s + t[..., j]
    return s


def _cancelling(rows: int, n: int, seed: int) -> torch.Tensor:
    """Terms of mixed magnitude and sign, where the order of float32 adds changes the result."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n, generator=g) * torch.logspace(-4, 4, n)[torch.randperm(n, generator=g)]).float()


def test_seq_sum_and_cumsum_are_the_c_loop():
    t = _cancelling(300, 33, seed=1)
    t[0, 0] = -0.0
    assert not torch.equal(t.sum(-1), _loop_sum(t)), "pairwise and sequential sums should differ on this data"
    got = tk.seq_sum_triton(t.to(DEV)).cpu()
    assert torch.equal(got.view(torch.int32), _loop_sum(t).view(torch.int32))
    cum = tk.seq_cumsum_triton(t.reshape(3, 100, 33).to(DEV)).cpu()
    assert cum.shape == (3, 100, 34) and torch.equal(cum[..., 0], torch.zeros(3, 100))
    want = torch.stack([torch.zeros(300)] + [_loop_sum(t[:, : j + 1]) for j in range(33)], -1)
    assert torch.equal(cum.reshape(300, 34), want)


def test_make_qp_scale_kernel_equals_torch_loops():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(700, 32, generator=g) * torch.rand(700, 1, generator=g) * 3
    x[::7, 5] = -x[::7, 5]  # one flipped sign: levels stored modulo 256, as the C uint8 array
    x[3] = 0.0  # a dead block
    w = torch.rand(700, 32, generator=g) ** 4 + 1e-3
    want = _make_qp_quants(x, w, 3)  # torch loops on the CPU
    got = tk.make_qp_scale_triton(x.to(DEV), w.to(DEV), 3).cpu()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_ports_dispatch_to_the_kernels():
    assert ref_quant.seq_kernels_on(torch.zeros(1, device="cuda"))
    assert not ref_quant.seq_kernels_on(torch.zeros(1))


@pytest.mark.parametrize("fmt", [QuantFormat.IQ2_XS, QuantFormat.IQ3_XXS], ids=lambda f: f.value)
def test_best_neighbour_kernel_equals_torch_scan(fmt):
    """Off-grid points of every list length (IQ2_XS's reach 292 entries), ties to the first minimum."""
    tab = _tables(fmt, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    off = (tab.counts > 0).nonzero().squeeze(1)
    u = off[torch.randint(len(off), (600,), generator=g)]
    u[:5] = tab.counts.argmax()  # the longest list
    n = tab.q.shape[1]
    xv = torch.rand(600, n, generator=g) * 6
    xv[10:20] = 1.0  # equal distances to several neighbours
    wa = torch.rand(600, n, generator=g) + 0.01
    scale = torch.rand(600, generator=g) + 0.5
    want = _best_neighbour(tab, u, xv, wa, scale)
    got = tk.best_neighbour_triton(*(t.to(DEV) for t in (tab.neighbours, tab.counts, tab.q, u, xv, wa, scale))).cpu()
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", [QuantFormat.IQ1_S, QuantFormat.IQ1_M], ids=lambda f: f.value)
def test_iq1_split_scan_equals_the_replayed_scan(fmt):
    """The kernel runs C's scan over all splits; the torch port scores them at once and replays the near-best:
    both accept the same candidate at the same float32 scale (near-ties included)."""
    g = torch.Generator().manual_seed(4)
    n = 32 if fmt is QuantFormat.IQ1_S else 16
    xs = torch.randn(300, n, generator=g).sort(1).values
    xs[:20] = torch.round(xs[:20] * 2) / 2  # ties between splits
    ws = torch.rand(300, n, generator=g) + 0.05
    if fmt is QuantFormat.IQ1_S:
        want = _split_search(xs, ws)
        sums = (ref_quant.seq_cumsum(ws * xs), ref_quant.seq_cumsum(ws))
        scale, pick = tk.iq1_split_triton(tuple(t.to(DEV) for t in sums))
        i1, i2 = torch.triu_indices(n + 1, n + 1)
        pc = pick.cpu().clamp(min=0)
        got = (scale.cpu(), i1[pc // 2], i2[pc // 2], torch.where(pc % 2 == 0, 1, -1), pick.cpu() >= 0)
    else:
        second = torch.rand(300, n, generator=g) < 0.5
        want = _split_search_m(xs, ws, second)
        wx, zero = ws * xs, torch.zeros_like(xs)
        sums = [ref_quant.seq_cumsum(torch.where(h, v, zero)) for v in (wx, ws) for h in (~second, second)]
        scale, pick = tk.iq1_split_triton(tuple(t.to(DEV) for t in sums))
        i1, i2 = torch.triu_indices(n + 1, n + 1)
        pc = pick.cpu().clamp(min=0)
        got = (scale.cpu(), i1[pc // 4], i2[pc // 4], pc % 4, pick.cpu() >= 0)
    assert bool(want[4].all())
    for a, b in zip(got, want):
        assert torch.equal(a, b)
