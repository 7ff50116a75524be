"""GGML types as data (``formats``), llama.cpp's own quantizers over ctypes (``libggml``), llama.cpp's
preset mixes (``presets``), per-tensor type assignment (``assign``) and the GGUF imatrix format
(``imatrix``)."""

from dq.quant.formats import FORMATS, FormatSpec, QuantFormat, parse_format, row_nbytes, tensor_nbytes

__all__ = ["FORMATS", "FormatSpec", "QuantFormat", "parse_format", "row_nbytes", "tensor_nbytes"]
