"""Exporters of a plan: quantized GGUF with a type per tensor (``gguf_quantize``) and dynamic bitsandbytes
NF4 safetensors (``safetensors_bnb``, with its measurement ``bnb_measure`` and plan ``bnb_plan``)."""
