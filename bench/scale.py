"""A checkpoint larger than this machine's memory, through convert, analyze, plan and quantize.

A Mixtral-8x7B-shaped model (real widths: hidden 4096, 8 experts of 14336, 32 heads / 8 KV heads) with
``--layers`` decoder layers of random weights is written to disk one layer at a time (it is never whole in
memory), then each stage runs in its own process and its wall time and peak RSS (``VmHWM`` of the
child's address space) are reported against the checkpoint's size and its largest decoder block in float32. Settings are
small where they do not change memory (calibration tokens, two candidate types) so the run fits in an
hour on 2 cores.

    python bench/scale.py --layers 1 9         # 3.5 and 25.1 GiB of BF16 weights on a 23.5 GiB machine
                                               # (2.7 GiB a layer; 9 layers: ~56 GiB of disk for the
                                               # checkpoint, the BF16 GGUF and the quant, deleted
                                               # after each size unless --keep)
Prints a table, writes ``bench/results/scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
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

    weight_map, total, n = {}, 0, layers + 1

    def save(k: int, d: dict) -> int:  # one shard, then it is dropped: the model is never whole in memory
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(d, out / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in d})
        return sum(t.numel() * 2 for t in d.values())

    total += save(0, {"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                      "lm_head.weight": w(vocab, HIDDEN)})
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
        total += save(i + 1, d)
        del d
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


# Peak memory of the stage's own process. VmHWM (kB) is the peak RSS of this address space (exec resets it,
# whereas ru_maxrss keeps the forked parent's peak). RSS also counts pages of files the stage maps
# (safetensors shards, GGUFs): the kernel can drop those under pressure, so a sampler thread records the
# peak of the anonymous part (RssAnon), the memory the stage really holds, beside it.
_RSS = ("import atexit, re, threading, time\n"
        "def _kb(k): return int(re.search(k + r':\\s*(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "_peak = [0]\n"
        "def _watch():\n"
        "    while True: _peak[0] = max(_peak[0], _kb('RssAnon')); time.sleep(0.05)\n"
        "threading.Thread(target=_watch, daemon=True).start()\n"
        "import resource\n"
        "atexit.register(lambda: print('DQ_PEAK_RSS', _kb('VmHWM'), max(_peak[0], _kb('RssAnon')), "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n")


def run_stage(stage: str, model: Path, work: Path) -> dict:
    """One stage in a fresh process: its wall time and its own peak RSS."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", "import sys\n" + _RSS + _STAGES[stage], str(model), str(work)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{proc.stderr[-3000:]}")
    hwm, anon, child = (int(v) * 1024 for v in proc.stdout.strip().splitlines()[-1].split()[1:])
    return {"stage": stage, "seconds": round(time.time() - t0, 1), "peak_rss_bytes": hwm, "peak_anon_bytes": anon,
            "peak_child_rss_bytes": child}


def run_size(work: Path, layers: int, keep: bool) -> dict:
    """Write (once) the ``layers``-layer checkpoint, then every stage on it; unless ``keep``, delete the
    checkpoint, its converted GGUF and the outputs afterwards (9 layers take ~56 GiB of disk)."""
    import shutil

    from dq.convert.source import converted_dir
    from dq.models import materialize

    model = work / f"mixtral-8x7b-shaped-{layers}l"
    if not (model / "model.safetensors.index.json").is_file():
        size = write_checkpoint(model, layers, materialize("smollm2-135m"))
    else:
        size = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    out = work / f"out-{layers}l"
    out.mkdir(parents=True, exist_ok=True)
    converted = converted_dir(model)
    doc = {"layers": layers, "checkpoint_bytes": size, "rows": [run_stage(s, model, out) for s in _STAGES]}
    if not keep:
        for d in (out, converted, model):
            shutil.rmtree(d, ignore_errors=True)
    return doc


def render(doc: dict) -> str:
    gib = 2**30
    block = doc["block_fp32_bytes"]
    lines = [f"This machine: {doc['machine_bytes'] / gib:.1f} GiB of RAM. Largest decoder block in float32: "
             f"{block / gib:.2f} GiB. Each stage runs in a fresh process; `peak RSS` is its VmHWM, which counts "
             f"mapped file pages the kernel may drop; `peak anon` is the peak of its anonymous memory (RssAnon, "
             f"sampled every 50 ms), what the stage holds; `child` is the peak RSS of a process the stage started "
             f"(llama.cpp's converter).", "",
             "| checkpoint (BF16) | layers | stage | wall (s) | peak RSS (GiB) | peak anon (GiB) | anon - block (GiB) "
             "| child peak RSS (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for size in doc["sizes"]:
        for r in size["rows"]:
            lines.append(f"| {size['checkpoint_bytes'] / gib:.1f} GiB | {size['layers']} | {r['stage']} | "
                         f"{r['seconds']} | {r['peak_rss_bytes'] / gib:.2f} | {r['peak_anon_bytes'] / gib:.2f} | "
                         f"{(r['peak_anon_bytes'] - block) / gib:.2f} | {r['peak_child_rss_bytes'] / gib:.2f} |")
    return "\n".join(lines)


def main() -> None:
    import os

    from dq.cache import cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 9],
                    help="decoder layers of each checkpoint (several: memory and time against size)")
    ap.add_argument("--work", type=Path, default=None, help="checkpoint and outputs (default $DQ_CACHE/bench/scale)")
    ap.add_argument("--results", type=Path, default=Path("bench/results"))
    ap.add_argument("--keep", action="store_true", help="keep each size's checkpoint, GGUFs and outputs")
    ap.add_argument("--append", action="store_true",
                    help="keep the other sizes already in --results/scale.json (measured on this machine)")
    args = ap.parse_args()
    work = args.work or cache_dir() / "bench" / "scale"
    block = 4 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN // 4 + EXPERTS * 3 * HIDDEN * INTER + EXPERTS * HIDDEN)
    doc = {"machine_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "block_fp32_bytes": block,
           "sizes": []}
    args.results.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/scale.py --layers " + " ".join(str(n) for n in args.layers)
    old = args.results / "scale.json"
    if args.append and old.is_file():
        prev = json.loads(old.read_text())
        if (prev["machine_bytes"], prev["block_fp32_bytes"]) == (doc["machine_bytes"], block):
            doc["sizes"] = [s for s in prev["sizes"] if s["layers"] not in args.layers]
            cmd = "; ".join(c for c in (prev.get("command"), cmd + " --append") if c)
    for n in args.layers:
        doc["sizes"].append(run_size(work, n, args.keep))
        doc["sizes"].sort(key=lambda s: s["layers"])
        text = render(doc)  # written after every size: a long run that stops keeps what it measured
        print(text)
        (args.results / "scale.json").write_text(json.dumps(doc | {"command": cmd}, indent=1))
        (args.results / "scale.md").write_text(f"# Beyond RAM\n\n`{cmd}`\n\n{text}\n")


if __name__ == "__main__":
    main()
