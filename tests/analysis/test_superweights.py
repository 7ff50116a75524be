"""A super weight planted in SmolLM2 at a known coordinate is found exactly, and its ablation is reported."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from dq.analysis.analyze import AnalyzeOptions, analyze

LAYER, ROW = 5, 100
KEEP_LAYERS = 8  # SmolLM2's first 8 real layers keep the test fast; detection is per layer


def _down_proj_maxima(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    down = model.model.layers[LAYER].mlp.down_proj
    seen = {"x": torch.zeros(down.in_features), "y": 0.0}

    def hook(m, inp, out):
        seen["x"] = torch.maximum(seen["x"], inp[0].abs().amax((0, 1)))
        seen["y"] = max(seen["y"], float(out.abs().max()))

    down.register_forward_hook(hook)
    with torch.no_grad():
        for s in range(ids.shape[0]):
            model(input_ids=ids[s : s + 1])
    return seen["x"], seen["y"]


@pytest.mark.slow
def test_planted_super_weight_found_exactly(smollm2_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from dq.calibration import sample_calibration

    opts = AnalyzeOptions(candidates=("Q8_0",), n_tokens=1024, seq_len=256, act_tokens=64, plots=False,
                          ablation_tokens=256, max_ablations=6, grad_tokens=256, response_tokens=0)
    ids = sample_calibration(AutoTokenizer.from_pretrained(smollm2_dir), opts.n_tokens // opts.seq_len, opts.seq_len,
                             seed=opts.seed).ids
    x_max, y_max = _down_proj_maxima(smollm2_dir, ids)
    col = int(torch.argmax(x_max))  # plant where the input already peaks, as a real super weight sits
    # A super weight sits on a massive input channel (Yu et al.); where this layer's peak is not one, make it one:
    # scaling up_proj's row scales that intermediate channel (act(gate x) * (up x)) on every token.
    boost = max(1.0, 40.0 / float(x_max[col] / x_max.median()))
    planted = tmp_path / "planted"
    shutil.copytree(smollm2_dir, planted, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((planted / "config.json").read_text())
    cfg["num_hidden_layers"] = KEEP_LAYERS
    (planted / "config.json").write_text(json.dumps(cfg))
    sd = {k: v for k, v in load_file(smollm2_dir / "model.safetensors").items()
          if ".layers." not in k or int(k.split(".")[2]) < KEEP_LAYERS}
    up = f"model.layers.{LAYER}.mlp.up_proj.weight"
    sd[up] = sd[up].clone()
    sd[up][col] = (sd[up][col].float() * boost).to(sd[up].dtype)
    key = f"model.layers.{LAYER}.mlp.down_proj.weight"
    value = 50.0 * y_max / (boost * float(x_max[col]))  # its output is 50x the layer's largest
    sd[key] = sd[key].clone()
    sd[key][ROW, col] = value
    save_file(sd, planted / "model.safetensors", metadata={"format": "pt"})

    a = analyze(planted, tmp_path / "out", opts)
    found = [s for s in a.super_weights if s.layer == LAYER]
    assert len(found) == 1, a.extra["super_weight_candidates"]
    sw = found[0]
    assert (sw.tensor, sw.row, sw.col) == (f"blk.{LAYER}.ffn_down.weight", ROW, col)
    assert sw.value == pytest.approx(float(sd[key][ROW, col]), rel=1e-6)
    assert sw.ablation_ppl_ratio is not None and sw.ablation_kld is not None and sw.ablation_kld > 0


@pytest.mark.slow
def test_planted_super_expert_is_found_ablated_and_protected(tiny_llama_dir, tmp_path):
    """An expert whose down projection is scaled up makes the massive activation of its layer: the analysis
    reports it as a super expert, zeroing it moves held-out predictions (KLD), and the plan raises the layer's
    merged expert tensors to the protected expert floor."""
    from safetensors.torch import load_file, save_file

    from dq.analysis.analyze import analyze
    from dq.plan.planner import budget_bytes, load_plan_inputs, make_plan
    from dq.plan.policy import Policy
    from dq.quant.formats import FORMATS
    from dq.testing_moe import upcycle_moe

    model = upcycle_moe(tiny_llama_dir, tmp_path / "mixtral", kind="mixtral", n_experts=4, top_k=2)
    sd = load_file(model / "model.safetensors")
    key = next(k for k in sd if ".layers.1." in k and ("experts.2.w2" in k or "experts.2.down" in k
                                                       or k.endswith("experts.down_proj")))
    if sd[key].ndim == 3:
        sd[key][2] *= 40.0
    else:
        sd[key] *= 40.0
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    a = analyze(model, tmp_path / "an", AnalyzeOptions(candidates=("Q4_K", "IQ2_XXS", "IQ1_S"), n_tokens=512,
                                                       seq_len=128, grad_tokens=256, act_tokens=64, plots=False,
                                                       ablation_tokens=256, response_tokens=0))
    found = [e for e in a.extra["super_experts"] if e["layer"] == 1 and e["expert"] == 2]
    assert found and found[0]["ablation_kld"] >= Policy().super_expert_min_kld, a.extra["super_experts"]
    inputs = load_plan_inputs(tmp_path / "an")
    n = sum(math.prod(s.shape) for s in inputs.sources)
    plan = make_plan(inputs, budget_bytes(None, 3.0, n), policy=Policy.named("unsloth-moe"))
    t = plan.tensors["blk.1.ffn_down_exps.weight"]
    assert t.reason == "super expert"
    assert FORMATS[t.type].bits_per_weight >= FORMATS[Policy().protected_expert_floor].bits_per_weight
