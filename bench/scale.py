"""A checkpoint larger than this machine's memory, through convert, analyze, plan and quantize.

A Mixtral-8x7B-shaped model (real widths: hidden 4096, 8 experts of 14336, 32 heads / 8 KV heads) with
``--layers`` decoder layers of random weights is written to disk one layer at a time (it is never whole in
memory), then each stage runs in its own process and its wall time and peak RSS (``ru_maxrss`` of the
child) are reported against the checkpoint's size and its largest decoder block in float32. Settings are
small where they do not change memory (calibration tokens, two candidate types) so the run fits in an
hour on 2 cores.

    python bench/scale.py --layers 10          # ~29 GB of BF16 weights on a 24 GiB machine
Prints a table, writes ``bench/results/scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTER, EXPERTS, HEADS, KV_HEADS = 4096, 14336, 8, 32, 8


def write_checkpoint(out: Path, layers: int, tokenizer_dir: Path) -> int:
    """A Mixtral-shaped checkpoint in per-layer safetensors shards; returns its bytes."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    out.mkdir(parents=True, exist_ok=True)
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_local_experts=EXPERTS,
                        num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False)
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, total = {}, 0
    shards = [{"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
               "lm_head.weight": w(vocab, HIDDEN)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        d = {p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": w(HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
             p + "self_attn.k_proj.weight": w(HIDDEN // (HEADS // KV_HEADS), HIDDEN),
             p + "self_attn.v_proj.weight": w(HIDDEN // (HEADS // KV_HEADS), HIDDEN),
             p + "block_sparse_moe.gate.weight": w(EXPERTS, HIDDEN)}
        for e in range(EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            d.update({q + "w1.weight": w(INTER, HIDDEN), q + "w3.weight": w(INTER, HIDDEN), q + "w2.weight": w(HIDDEN, INTER)})
        shards.append(d)
    n = len(shards)
    for k, d in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(d, out / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in d})
        total += sum(t.numel() * 2 for t in d.values())
        del d
        shards[k] = None
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return total


_STAGES = {
    "convert": "from dq.convert.source import source_gguf; from pathlib import Path; source_gguf(Path(sys.argv[1]))",
    "analyze": ("from dq.analysis.analyze import analyze, AnalyzeOptions; "
                "analyze(sys.argv[1], sys.argv[2], AnalyzeOptions(n_tokens=1024, seq_len=512, grad_tokens=512, "
                "act_tokens=128, candidates=('Q4_K', 'Q2_K'), ablation_tokens=512, plots=False), resume=True)"),
    "plan": ("from dq.plan.planner import load_plan_inputs, make_plan, budget_bytes; import math; "
             "i = load_plan_inputs(sys.argv[2]); n = sum(math.prod(s.shape) for s in i.sources); "
             "make_plan(i, budget_bytes(None, 3.0, n)).save(sys.argv[2] + '/plan.yaml')"),
    "quantize": ("from dq.cli import main; sys.exit(main(['quantize', sys.argv[1], '--plan', sys.argv[2] + '/plan.yaml', "
                 "'-o', sys.argv[2] + '/m.gguf']))"),
}


_RSS = "import atexit, resource; atexit.register(lambda: print('DQ_PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); "


def run_stage(stage: str, model: Path, work: Path) -> dict:
    """One stage in a fresh process: its wall time and its own peak RSS."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", "import sys; " + _RSS + _STAGES[stage], str(model), str(work)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{proc.stderr[-3000:]}")
    peak = int(proc.stdout.strip().splitlines()[-1].split()[-1]) * 1024
    return {"stage": stage, "seconds": round(time.time() - t0, 1), "peak_rss_bytes": peak}


def main() -> None:
    from dq.cache import cache_dir
    from dq.models import materialize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None, help="checkpoint and outputs (default $DQ_CACHE/bench/scale)")
    ap.add_argument("--results", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    work = args.work or cache_dir() / "bench" / "scale"
    model = work / f"mixtral-8x7b-shaped-{args.layers}l"
    if not (model / "model.safetensors.index.json").is_file():
        size = write_checkpoint(model, args.layers, materialize("smollm2-135m"))
    else:
        size = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    block = 4 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN // 4 + EXPERTS * 3 * HIDDEN * INTER + EXPERTS * HIDDEN)
    out = work / f"out-{args.layers}l"
    out.mkdir(parents=True, exist_ok=True)
    mem = math.ceil(__import__("os").sysconf("SC_PHYS_PAGES") * __import__("os").sysconf("SC_PAGE_SIZE"))
    rows = [run_stage(s, model, out) for s in _STAGES]
    lines = [f"checkpoint {size / 2**30:.1f} GiB (BF16), {args.layers} layers; this machine {mem / 2**30:.1f} GiB; "
             f"largest block in float32 {block / 2**30:.2f} GiB", "",
             "| stage | wall (s) | peak RSS (GiB) | RSS - block (GiB) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['seconds']} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{(r['peak_rss_bytes'] - block) / 2**30:.2f} |")
    text = "\n".join(lines)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    doc = {"layers": args.layers, "checkpoint_bytes": size, "machine_bytes": mem, "block_fp32_bytes": block, "rows": rows}
    (args.results / "scale.json").write_text(json.dumps(doc, indent=1))
    (args.results / "scale.md").write_text(f"# Beyond RAM\n\n`python bench/scale.py --layers {args.layers}`\n\n"
                                           f"Each stage in a fresh process; peak RSS is that process's own "
                                           f"ru_maxrss.\n\n{text}\n")


if __name__ == "__main__":
    main()
