"""dq: dynamic quantization for large language models.

``import dq`` is lean: it pulls in neither torch, Triton, lm-eval nor llama.cpp. Subpackages:

- ``dq.quant``: the GGML type table, libggml's exact quantizers, presets and type assignment.
- ``dq.analysis``: calibration, importance matrices, per-tensor error measurement, super weights.
- ``dq.kernels``: Triton kernels (GPU) with torch references (CPU).
- ``dq.export``: HF -> GGUF conversion and quantized GGUF / safetensors writers.
- ``dq.evals``: KL divergence, perplexity and lm-eval tasks against the base model.
"""

__version__ = "0.1.0"
