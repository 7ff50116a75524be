"""Size-only plans of DeepSeek-R1 (671B) at Unsloth's dynamic ladders, beside Unsloth's published sizes.

No weights: the tensor list comes from llama.cpp's own converter run on a sparse checkpoint with R1's
config (``dq.convert.shapes``; transformers' ``DeepseekV3Config()`` defaults are DeepSeek-V3's, which R1
shares: 61 layers, 3 dense, 256 routed experts + 1 shared, MLA with q/kv LoRA ranks 1536/512, vocabulary
129,280), and every tensor takes its floor under the ``unsloth-*`` policy presets (``dq.plan.policy``).
Unsloth's sizes are the ones their R1 write-up published for UD-IQ1_S / UD-IQ1_M / UD-IQ2_XXS /
UD-Q2_K_XL; it does not say whether they are 10^9 or 2^30 bytes, so dq's sizes are given in both.

    python bench/deepseek_ladders.py
Prints a table, writes ``bench/results/deepseek_r1_ladders.{json,md}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LADDERS = [("UD-IQ1_S", "unsloth-iq1_s", 131), ("UD-IQ1_M", "unsloth-iq1_m", 158),
           ("UD-IQ2_XXS", "unsloth-iq2_xxs", 183), ("UD-Q2_K_XL", "unsloth-q2_k_xl", 212)]


def main() -> None:
    from transformers import DeepseekV3Config

    from dq.convert.shapes import tensors_from_config
    from dq.models import materialize
    from dq.plan.policy import PRESETS, Policy
    from dq.plan.sizes import floor_plan

    cfg = DeepseekV3Config().to_dict()
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    tensors = tensors_from_config(cfg, materialize("smollm2-135m"))
    rows = []
    for label, preset, published in LADDERS:
        fp = floor_plan(tensors, Policy.named(preset))
        floors = PRESETS[preset]["role_floors"]
        rows.append({"ladder": label, "policy": preset, "routed_gate_up": floors["expert_gate"],
                     "routed_down": floors["expert_down"], "early_down": PRESETS[preset]["early_expert_down_floor"],
                     "dq_bytes": fp.tensor_bytes, "dq_gb": fp.tensor_bytes / 1e9, "dq_gib": fp.tensor_bytes / 2**30,
                     "bits_per_weight": fp.bits_per_weight, "unsloth_published": published})
    lines = [f"DeepSeek-R1: {len(tensors)} GGUF tensors, {fp.n_weights / 1e9:.1f} B weights",
             "", "| ladder | routed gate/up | routed down (first 3 MoE layers) | dq size GB | dq size GiB | "
             "bits/weight | Unsloth published |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ladder']} | {r['routed_gate_up']} | {r['routed_down']} ({r['early_down']}) | "
                     f"{r['dq_gb']:.1f} | {r['dq_gib']:.1f} | {r['bits_per_weight']:.3f} | {r['unsloth_published']} |")
    text = "\n".join(lines)
    print(text)
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "deepseek_r1_ladders.json").write_text(json.dumps(rows, indent=1))
    (out / "deepseek_r1_ladders.md").write_text(
        "# DeepSeek-R1 size-only plans at Unsloth's ladders\n\n`python bench/deepseek_ladders.py`\n\n"
        "Attention, dense layers and the embedding at Q4_K, shared experts and the output head at Q6_K, routers "
        "and norms F32 (the `unsloth-*` presets); no GGUF header counted.\n\n" + text + "\n")


if __name__ == "__main__":
    sys.exit(main())
