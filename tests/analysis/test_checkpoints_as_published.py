"""Checkpoints as published: block-scaled FP8 weights read as llama.cpp's converter reads them, persistent
buffers loaded, and a quantization dq cannot read refused before any work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dq.errors import UnsupportedArchitectureError

BLOCK = 128


def _fp8_checkpoint(src, out):
    """``src`` re-saved as DeepSeek ships its weights: F8_E4M3 linears with a per-128x128 weight_scale_inv."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    sd = load_file(out / "model.safetensors")
    new = {}
    for k, w in sd.items():
        if w.ndim == 2 and ".layers." in k:
            w = w.float()
            rows, cols = -(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)
            scale = torch.zeros(rows, cols)
            q = torch.empty_like(w)
            for i in range(rows):
                for j in range(cols):
                    blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
                    scale[i, j] = blk.abs().max().clamp_min(1e-12) / 448.0
                    q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = blk / scale[i, j]
            new[k] = q.to(torch.float8_e4m3fn)
            new[k + "_scale_inv"] = scale
        else:
            new[k] = w
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": [BLOCK, BLOCK]}
    (out / "config.json").write_text(json.dumps(cfg))
    return out, new


def test_fp8_weights_equal_the_converted_gguf(tiny_llama_dir, tmp_path):
    from dq.analysis.loader import ModelSkeleton
    from dq.convert.convert import convert_hf_to_gguf
    from dq.quant.formats import parse_format, tensor_nbytes
    from dq.quant.gguf_header import read_gguf_header
    from dq.quant.libggml import dequantize

    model, sd = _fp8_checkpoint(tiny_llama_dir, tmp_path / "fp8")
    sk = ModelSkeleton.open(model)
    sk.load(sk.layer_prefix(1))
    ours = sk.module_param("model.layers.1.mlp.down_proj.weight").detach().numpy()
    # the dequantization by hand: every 128x128 block times its scale, rounded to BF16
    scale = sd["model.layers.1.mlp.down_proj.weight_scale_inv"].repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    hand = (sd["model.layers.1.mlp.down_proj.weight"].float() * scale[:256, :512]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours, hand)
    gguf = convert_hf_to_gguf(model, tmp_path / "fp8.gguf")
    h = read_gguf_header(gguf)
    t = next(t for t in h.tensors if t.name == "blk.1.ffn_down.weight")
    fmt = parse_format(t.ggml_type)
    theirs = dequantize(h.tensor_bytes(t, tensor_nbytes(fmt, t.shape)), fmt, t.shape)
    np.testing.assert_array_equal(ours, theirs)  # dq measures the model the converter writes


def test_unreadable_quantization_is_refused_before_analysis(tiny_llama_dir, tmp_path):
    from dq.analysis.analyze import analyze

    bad = tmp_path / "gptq"
    shutil.copytree(tiny_llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="'gptq'-quantized checkpoint .* original weights"):
        analyze(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "analysis.json").exists()


def test_persistent_buffers_are_loaded(smollm2_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from dq.analysis.loader import ModelSkeleton
    from dq.testing_archs import tiny_arch

    model = tiny_arch("deepseek_v3", tmp_path / "ds", bpe_tokenizer_dir=smollm2_dir)
    sd = load_file(model / "model.safetensors")
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    sd[key] = torch.tensor([0.5, -1.0, 2.0, 0.25])
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    sk = ModelSkeleton.open(model)
    sk.load(sk.layer_prefix(1))
    got = sk.module("model.layers.1.mlp.gate").e_score_correction_bias
    torch.testing.assert_close(got, torch.tensor([0.5, -1.0, 2.0, 0.25]))
