"""``import dq`` and ``import dq.kernels`` must not import Triton or initialise CUDA (torchao's lean-import test)."""

import subprocess
import sys


def test_import_dq_kernels_is_lean():
    code = (
        "import sys, torch\n"
        "import dq, dq.kernels\n"
        "from dq.kernels import quant_error, dequantize, act_stats\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_auto_backend_uses_torch_reference():
    import torch

    from dq.kernels import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), True) == "torch"
