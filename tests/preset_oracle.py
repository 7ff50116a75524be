"""The truth for dq's preset rules: llama.cpp's own dry run of ``llama_model_quantize`` on the same GGUF."""

from __future__ import annotations

import numpy as np

from dq.quant.gguf_header import read_gguf_header
from dq.quant.llama_quantize import PRESETS, llama_quantize
from dq.quant.preset_rules import preset_types


def assert_presets_match_dry_run(gguf, presets=tuple(PRESETS)) -> None:
    """Every preset, with and without an imatrix: dq's decision equals the dry run's, tensor for tensor."""
    header = read_gguf_header(gguf)
    for preset in presets:
        for has_imatrix in (False, True):
            flag = {"x": np.ones(1, np.float32)} if has_imatrix else None  # llama.cpp only asks whether one is given
            want = llama_quantize(gguf, None, preset, dry_run=True, imatrix=flag)
            got = preset_types(header, preset, has_imatrix=has_imatrix)
            assert got is not None, header.value("general.architecture")
            diff = {n: (t, got.types.get(n)) for n, t in want.types.items() if got.types.get(n) is not t}
            assert not diff, (preset, has_imatrix, diff)
            assert set(got.types) == set(want.types)
            assert got.requested == want.requested, (preset, has_imatrix)
