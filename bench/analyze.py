"""Benchmark `dq analyze`: wall time and peak RSS on SmolLM2-135M and Gemma-3-270M, full candidate list.

Each model runs in its own subprocess so ``ru_maxrss`` is that run's peak. The bound checked is

    peak RSS <= baseline + block + activations + chunks + measurement + SLACK

- baseline: RSS of a separate process that imports torch/transformers, builds the meta skeleton, loads
  the tokenizer and tokenizes the calibration text: the runtime every run needs (Gemma-3's 262k-token
  tokenizer alone is ~300 MiB), measured, not guessed;
- block: one decoder block in float32 plus its checkpoint-dtype copy while it is converted on load;
- activations: calibration hidden states, three ``tokens x d`` float32 matrices at once (layer input and
  output; at embedding time the list, its concatenation and the used embedding rows), plus the kept
  activation-error inputs (``act_tokens x (6d + intermediate)`` float32);
- chunks: the whole-vocabulary matrices are never resident: one 32 MiB float32 row chunk of the
  embedding / LM head plus its read buffer, and six ``tokens x vocab-chunk`` 16 MiB logit temporaries;
- measurement: libggml round trip of the ``max_elements`` row subset (float32 w, q, diff; float64
  squares: 28 bytes per weight);
- SLACK: the stated constant (256 MiB: allocator arenas and fragmentation, libggml and torch thread
  buffers, tokenizer, report plotting).

No term grows with the vocabulary or the number of layers; only ``block`` grows with the model's width.

Usage: python bench/analyze.py [--models smollm2-135m gemma3-270m] [--tokens 8192]
Writes bench/results/analyze.json and bench/results/analyze.md and prints a table. Timings are wall
time on a shared machine (other processes compete for the same cores) and are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SLACK = 256 * 2**20


def _child(model: str, out: str, tokens: int) -> dict:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    from dq.analysis.analyze import _ROW_CHUNK_BYTES, AnalyzeOptions, analyze
    from dq.analysis.loader import ModelSkeleton
    from dq.analysis.superweights import _LOGIT_CHUNK_BYTES
    from dq.models import resolve_model

    model_dir = resolve_model(model)
    sk = ModelSkeleton.open(model_dir)
    prefix = sk.layer_prefix(0)
    params = dict(sk.module(prefix).named_parameters())
    block = sum(p.numel() for p in params.values()) * 4
    for name in params:  # the checkpoint-dtype copy held while the block is converted to float32
        for k in sk._targets.get(f"{prefix}.{name}", []):
            b, e = sk._handles[sk._key_file[k]].header[k]["data_offsets"]
            block += e - b
    emb = sk.model.get_input_embeddings().weight
    d = int(sk.text_config.hidden_size)
    inter = int(getattr(sk.text_config, "intermediate_size", 4 * d))
    del sk
    opts = AnalyzeOptions(n_tokens=tokens)
    acts = 3 * tokens * d * 4 + opts.act_tokens * (6 * d + inter) * 4
    chunks = _ROW_CHUNK_BYTES * 3 // 2 + 6 * _LOGIT_CHUNK_BYTES
    measurement = (opts.max_elements or emb.numel()) * 28
    t0 = time.time()
    a = analyze(model, out, opts)
    wall = time.time() - t0
    peak = _rss_peak()
    baseline = _baseline(model, tokens, opts)
    bound = baseline + block + acts + chunks + measurement + SLACK
    return {
        "model": model, "tokens": a.n_tokens, "candidates": len(a.candidates), "tensors": len(a.tensors),
        "wall_s": round(wall, 1), "peak_rss_mib": round(peak / 2**20), "baseline_mib": round(baseline / 2**20),
        "block_mib": round(block / 2**20, 1), "activations_mib": round(acts / 2**20, 1),
        "chunks_mib": round(chunks / 2**20, 1), "measurement_mib": round(measurement / 2**20, 1),
        "slack_mib": round(SLACK / 2**20), "embedding_f32_mib": round(emb.numel() * 4 / 2**20, 1),
        "bound_mib": round(bound / 2**20), "within_bound": peak <= bound,
        "super_weights": [s.to_dict() for s in a.super_weights],
    }


def _baseline(model: str, tokens: int, opts) -> int:
    """RSS of a fresh process after the fixed runtime of a run: imports, skeleton, tokenizer, tokenized text."""
    code = (
        "import sys\n"
        "from transformers import AutoTokenizer\n"
        "from dq.analysis.loader import ModelSkeleton\n"
        "from dq.analysis.stream import tokenize_calibration\n"
        "from dq.data import calibration_text\n"
        "from dq.models import resolve_model\n"
        f"d = resolve_model({model!r})\n"
        "sk = ModelSkeleton.open(d)\n"
        "ids = tokenize_calibration(AutoTokenizer.from_pretrained(d), calibration_text(), "
        f"{tokens}, {opts.seq_len})\n"
        "with open('/proc/self/statm') as fh:\n"
        "    print(int(fh.read().split()[1]) * __import__('resource').getpagesize())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.tokens)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in args.models:
        res = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child", m,
                              str(args.out / f"analyze-{m}")], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return res.returncode
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    (args.out / "analyze.json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"# dq analyze: peak RSS and wall time ({args.tokens} calibration tokens, full candidate list)",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; wall time is noisy (shared cores).",
        "Bound = baseline (runtime: imports, meta skeleton, tokenizer, tokenized text) + one block (float32 + checkpoint copy) +",
        "activations (3 x tokens x d x 4 + act_tokens x (6d + inter) x 4) + chunks (embedding/head row chunk,",
        "logit chunks) + measurement (max_elements x 28 B) + slack (256 MiB). All MiB.",
        "",
        "| model | tokens | types | tensors | wall s | peak RSS | baseline | block | acts | chunks | measure | slack "
        "| bound | within | (f32 embedding, not held) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['candidates']} | {r['tensors']} | {r['wall_s']} | "
            f"{r['peak_rss_mib']} | {r['baseline_mib']} | {r['block_mib']} | {r['activations_mib']} | "
            f"{r['chunks_mib']} | {r['measurement_mib']} | {r['slack_mib']} | {r['bound_mib']} | "
            f"{r['within_bound']} | {r['embedding_f32_mib']} |")
    lines += ["", "Super weights (ablation on held-out text):", ""]
    for r in rows:
        for sw in r["super_weights"]:
            lines.append(f"- {r['model']}: {sw['tensor']}[{sw['row']},{sw['col']}] = {sw['value']:+.3g}: "
                         f"ppl x{sw['ablation_ppl_ratio']:.3f}, KLD {sw['ablation_kld']:.4f}")
    text = "\n".join(lines) + "\n"
    (args.out / "analyze.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
