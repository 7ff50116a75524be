"""Calibration and measurement: streaming block-by-block forward passes, importance matrices
(llama.cpp-compatible), per-tensor weight and activation error for each candidate GGML type, super
weights, and tensor roles (attention, FFN, routed/shared experts, router, vision tower)."""
