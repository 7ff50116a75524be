"""Hugging Face -> GGUF with llama.cpp's own ``convert_hf_to_gguf.py``: the converter from the pinned
llama-cpp-python sdist (``llama_cpp``), running it (``convert``) and the cached unquantized source GGUF of a
model (``source``), whose tensor list every later stage prices and writes."""
