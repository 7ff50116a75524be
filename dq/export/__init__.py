"""Writers: Hugging Face -> GGUF through llama.cpp's own converter (``convert``), quantized GGUF with a
type per tensor (``gguf_quantize``) over a minimal, atomic GGUF writer (``gguf_writer``)."""
