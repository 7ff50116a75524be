"""Dynamic NF4 safetensors on a tiny real Llama: held to transformers' own bitsandbytes quantization.

The oracle is transformers + bitsandbytes quantizing the same 16-bit checkpoint on load with the same
skip list: dq's written checkpoint must give identical logits, module for module.
"""

from __future__ import annotations

import json

import pytest

from tests._require import require

require("bitsandbytes")
torch = require("torch")

from dq.analysis.artifact import Analysis, SuperWeight, TensorMeasurement, TypeError_  # noqa: E402
from dq.analysis.roles import TensorRole  # noqa: E402
from dq.errors import BudgetError, NotAModelError, OutputNotWritableError, PlanError  # noqa: E402
from dq.export.bnb_plan import (  # noqa: E402
    PLAN_FILE,
    BnbPlan,
    ModuleMeasurement,
    Reason,
    module_role,
    select_modules,
)
from dq.export.safetensors_bnb import quantize_safetensors_bnb  # noqa: E402


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def tiny_quant(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bnb") / "tiny-dyn-nf4"
    return quantize_safetensors_bnb(tiny_llama_dir, out, n_tokens=512, seq_len=128,
                                    keep_fraction=0.2)


def test_checkpoint_equals_transformers_on_the_fly_bnb(tiny_llama_dir, tiny_quant):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    plan = tiny_quant.plan
    cfg = json.loads((tiny_quant.path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    assert cfg["llm_int8_skip_modules"] == plan.skip_modules()
    assert "lm_head" in cfg["llm_int8_skip_modules"]

    ours = AutoModelForCausalLM.from_pretrained(tiny_quant.path)
    modules = dict(ours.named_modules())
    for m in plan.modules:
        assert isinstance(modules[m.name], bnb.nn.Linear4bit) == m.quantize, m.name

    ref = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=plan.skip_modules()),
    )
    ids = torch.arange(1, 65).unsqueeze(0) * 7 % 500 + 3
    assert torch.equal(_logits(ours, ids), _logits(ref, ids))
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert sd_ours.keys() == sd_ref.keys()
    for k in sd_ours:
        assert torch.equal(sd_ours[k], sd_ref[k]), k


def test_plan_records_measurements_and_round_trips(tiny_quant):
    plan = BnbPlan.load(tiny_quant.path)
    assert plan == tiny_quant.plan
    assert plan.source == "measured" and plan.n_tokens == 512
    body = [m for m in plan.modules if m.role != "output"]
    assert all(m.act_err is not None and 0 < m.act_err < 1 for m in body)
    assert all(m.input_spike > 0 for m in body)
    kept = [m for m in body if not m.quantize]
    assert kept and 0 < plan.kept_param_fraction <= 0.2
    # the budget goes first to the module NF4 hurts most
    assert not max(body, key=lambda m: m.act_err).quantize
    files = sorted(p.name for p in tiny_quant.path.iterdir())
    assert {"config.json", "model.safetensors", PLAN_FILE, "tokenizer.model"} <= set(files)
    assert not [f for f in tiny_quant.path.parent.iterdir() if f.name.startswith(".")]  # no temp dirs left
    assert 4.0 < tiny_quant.bits_per_weight < 16.0


def test_act_err_matches_direct_computation(tiny_llama_dir):
    """act_err of one module, recomputed by hand from captured inputs and bitsandbytes' dequantization."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dq.calibration import sample_calibration
    from dq.export.bnb_measure import dequantize_nf4, measure_nf4, quantize_nf4

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    batches = sample_calibration(tok, 4, 64).ids
    name = "model.layers.1.mlp.down_proj"
    mod = dict(model.named_modules())[name]
    q = quantize_nf4(mod.weight)
    xs = []
    h = mod.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().reshape(-1, m.in_features).float()))
    stats = measure_nf4(model, batches, {name: q})[name]
    h.remove()
    x = torch.cat(xs)
    w, wq = mod.weight.detach().float(), dequantize_nf4(q).float()
    y = (x @ w.T).to(torch.bfloat16).float()
    expect = float((x @ (w - wq).to(torch.bfloat16).float().T).square().sum() / y.square().sum())
    assert stats["act_err"] == pytest.approx(expect, rel=1e-3)
    assert stats["weight_err"] == pytest.approx(float((w - wq).square().sum() / w.square().sum()), rel=1e-5)
    assert stats["input_spike"] == pytest.approx(float(x.abs().max()))


def test_explicit_keep_and_sharding(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    keep = {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"}
    r = quantize_safetensors_bnb(tiny_llama_dir, tmp_path / "q", keep=keep, max_shard_bytes=300_000)
    assert {m.name for m in r.plan.kept} == keep | {"lm_head"} and r.plan.source == "user"
    index = json.loads((r.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(r.path)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n in {m.name for m in r.plan.modules}}
    assert kinds["model.layers.0.mlp.down_proj"] == "Linear" and kinds["model.layers.0.mlp.up_proj"] == "Linear4bit"


def test_from_analysis(tiny_llama_dir, tmp_path):
    from dq.quant.formats import QuantFormat

    names = [f"model.layers.{i}.{p}" for i in range(2) for p in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}
    tensors = []
    for n in names:
        layer, rest = int(n.split(".")[2]), n.split(".", 3)[3]
        err = 0.9 if n == "model.layers.0.self_attn.k_proj" else 0.01 + 0.0001 * len(tensors)
        tensors.append(TensorMeasurement(
            name=f"blk.{layer}.{gguf[rest]}.weight", hf_name=f"{n}.weight", role=TensorRole.OTHER, layer=layer,
            shape=(1, 1), errors=(TypeError_(QuantFormat.IQ4_NL, QuantFormat.IQ4_NL, 1, 0.001, act_err=err),)))
    sw = SuperWeight(tensor="blk.1.ffn_down.weight", layer=1, row=0, col=0, value=1.0, input_spike=1.0, output_spike=1.0)
    analysis = Analysis(model="tiny", architecture="llama", candidates=(QuantFormat.IQ4_NL,),
                        tensors=tuple(tensors), super_weights=(sw,), n_tokens=99)
    r = quantize_safetensors_bnb(tiny_llama_dir, tmp_path / "q", analysis=analysis)
    reasons = {m.name: m.reason for m in r.plan.kept}
    assert reasons == {"lm_head": Reason.OUTPUT, "model.layers.0.self_attn.k_proj": Reason.OUTLIER,
                       "model.layers.1.mlp.down_proj": Reason.SUPER_WEIGHT}
    assert r.plan.source == "analysis" and r.plan.n_tokens == 99

    other = Analysis(model="x", architecture="llama", candidates=(), tensors=(
        TensorMeasurement(name="blk.0.attn_q.weight", hf_name="transformer.h.0.q.weight", role=TensorRole.ATTN_Q,
                          layer=0, shape=(1, 1)),))
    with pytest.raises(PlanError, match="same model"):
        quantize_safetensors_bnb(tiny_llama_dir, tmp_path / "q2", analysis=other)


def test_bad_input(tiny_llama_dir, tiny_quant, tmp_path):
    with pytest.raises(OutputNotWritableError, match="already exists"):
        quantize_safetensors_bnb(tiny_llama_dir, tiny_quant.path, keep=set())
    with pytest.raises(NotAModelError, match="already quantized"):
        quantize_safetensors_bnb(tiny_quant.path, tmp_path / "again", keep=set())
    with pytest.raises(PlanError, match="not linear modules"):
        quantize_safetensors_bnb(tiny_llama_dir, tmp_path / "q", keep={"model.layers.0.mlp.down"})
    with pytest.raises(BudgetError, match="outside"):
        quantize_safetensors_bnb(tiny_llama_dir, tmp_path / "q", keep_fraction=1.5)
    with pytest.raises(OutputNotWritableError, match="does not exist"):
        quantize_safetensors_bnb(tiny_llama_dir, tmp_path / "missing" / "q", keep=set())
    assert not (tmp_path / "q").exists()


def test_failed_write_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    import dq.export.safetensors_bnb as mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "_write_shards", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        quantize_safetensors_bnb(tiny_llama_dir, tmp_path / "q", keep=set())
    assert list(tmp_path.iterdir()) == []


# --- the policy, on hand-made measurements --------------------------------------------------------

def _m(name, shape=(64, 256), err=0.01, spike=1.0):
    return ModuleMeasurement(name, shape, act_err=err, input_spike=spike)


def test_policy_outlier_super_weight_vision_cpu_shape():
    ms = [_m(f"model.layers.{i}.mlp.down_proj", err=0.01 + 0.001 * i, spike=5.0 + i) for i in range(6)]
    ms[2] = _m("model.layers.2.mlp.down_proj", err=0.012, spike=900.0)  # massive activation
    ms += [_m("model.layers.0.self_attn.v_proj", err=0.4)]  # 4-bit breaks it
    ms += [_m("model.vision_tower.blocks.0.fc1", err=0.001), _m("lm_head", (512, 256)),
           _m("model.layers.0.self_attn.k_proj", shape=(40, 256))]
    plan = select_modules(ms, model="m")
    reasons = {m.name: m.reason for m in plan.kept}
    assert reasons == {
        "model.layers.2.mlp.down_proj": Reason.SUPER_WEIGHT, "model.layers.0.self_attn.v_proj": Reason.OUTLIER,
        "model.vision_tower.blocks.0.fc1": Reason.VISION, "lm_head": Reason.OUTPUT,
        "model.layers.0.self_attn.k_proj": Reason.CPU_SHAPE,
    }
    assert [m.name for m in plan.modules][:3] == ["lm_head", "model.layers.0.mlp.down_proj",
                                                 "model.layers.0.self_attn.k_proj"]


def test_policy_budget_fills_by_error_and_rejects_impossible():
    ms = [_m(f"model.layers.{i}.mlp.up_proj", err=0.01 * (i + 1)) for i in range(10)]
    plan = select_modules(ms, model="m", keep_fraction=0.3)
    assert sorted(m.name for m in plan.kept) == [f"model.layers.{i}.mlp.up_proj" for i in (7, 8, 9)]
    assert plan.kept_param_fraction == pytest.approx(0.3)
    ms.append(_m("model.visual.proj", shape=(64, 256 * 8)))
    with pytest.raises(BudgetError, match="raise it to at least"):
        select_modules(ms, model="m", keep_fraction=0.2)


def test_module_roles():
    assert module_role("model.layers.3.mlp.down_proj") == "ffn_down"
    assert module_role("model.layers.3.mlp.experts.7.down_proj") == "expert_down"
    assert module_role("model.layers.3.mlp.gate") == "router"
    assert module_role("model.layers.3.mlp.gate_proj") == "ffn_gate"
    assert module_role("visual.blocks.0.attn.qkv") == "vision"
    assert module_role("lm_head") == "output"


# --- dq quantize --format safetensors (parsed by dq's own CLI parser) ----------------------------

def _cli(argv):
    """Parse with dq's real CLI parser, so the --format safetensors wiring of `dq quantize` is tested."""
    from dq.cli import build_parser

    return build_parser().parse_args(["quantize", *argv])


def test_cli_target_size_dry_run_and_plan_reuse(tiny_llama_dir, tiny_quant, tmp_path, capsys):
    import os

    from dq.cli.quantize_safetensors import run_safetensors

    args = _cli([str(tiny_llama_dir), "--format", "safetensors", "-o", str(tmp_path / "dry"), "--dry-run", "--json",
                 "--keep", "model.layers.0.mlp.down_proj"])
    assert run_safetensors(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] is None and not (tmp_path / "dry").exists()
    assert {m["name"] for m in out["plan"]["modules"] if not m["quantize"]} == {"lm_head", "model.layers.0.mlp.down_proj"}

    args = _cli([str(tiny_llama_dir), "--format", "safetensors", "-o", str(tmp_path / "t"), "--target-size", "1.5MB",
                 "--calib-tokens", "256"])
    assert run_safetensors(args) == 0
    size = (tmp_path / "t" / "model.safetensors").stat().st_size
    assert 1_400_000 < size <= 1_500_000
    assert oct(os.stat(tmp_path / "t").st_mode & 0o777) != "0o700"

    # --plan dq_plan.json re-applies a plan's 16-bit set without measuring
    args = _cli([str(tiny_llama_dir), "--format", "safetensors", "-o", str(tmp_path / "re"),
                 "--plan", str(tiny_quant.path / PLAN_FILE)])
    assert run_safetensors(args) == 0
    assert BnbPlan.load(tmp_path / "re").skip_modules() == tiny_quant.plan.skip_modules()

    with pytest.raises(BudgetError, match="below the size with every linear module in NF4"):
        run_safetensors(_cli([str(tiny_llama_dir), "--format", "safetensors", "-o", str(tmp_path / "x"),
                              "--target-size", "100KB"]))
    with pytest.raises(PlanError, match="neither"):
        (tmp_path / "p.json").write_text("{}")
        run_safetensors(_cli([str(tiny_llama_dir), "--format", "safetensors", "-o", str(tmp_path / "x"),
                              "--plan", str(tmp_path / "p.json")]))


def test_densified_4bit_model_equals_bitsandbytes(tiny_quant):
    """dq.evals.hf_load swaps Linear4bit for nn.Linear of the same dequantized weights: bitsandbytes' own
    forward (bf16 compute) is the truth; the dense copy runs the matmul in float32, so logits agree to
    bf16 rounding, and each dense weight equals bitsandbytes' dequantization bit for bit."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from dq.evals.hf_load import densify_4bit, load_causal_lm

    ref = AutoModelForCausalLM.from_pretrained(tiny_quant.path).eval()
    dense = load_causal_lm(tiny_quant.path, "float32", dense_4bit=True)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in ref.modules())
    assert n4 == sum(m.quantize for m in tiny_quant.plan.modules) > 0
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dense.modules())
    ref_mods = dict(ref.named_modules())
    for name, m in dense.named_modules():
        if isinstance(ref_mods.get(name), bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(ref_mods[name].weight.data, ref_mods[name].weight.quant_state)
            assert torch.equal(m.weight, w.float()), name
    ids = torch.arange(1, 65).unsqueeze(0) * 7 % 500 + 3
    a, b = _logits(ref, ids), _logits(dense, ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    assert densify_4bit(dense) == 0


def test_fused_experts_are_reported_priced_and_kept(tiny_llama_dir, tmp_path, caplog):
    """transformers-5 MoE experts are fused 3-D tensors, no nn.Linear: bitsandbytes cannot quantize them.
    The NF4 path says so, records them in the plan, and counts them at 16 bits in the size."""
    from dq.testing_moe import upcycle_moe

    moe = upcycle_moe(tiny_llama_dir, tmp_path / "mixtral", kind="mixtral", n_experts=4, top_k=2)
    caplog.set_level("WARNING")
    q = quantize_safetensors_bnb(moe, tmp_path / "out", keep=[], dry_run=True)
    assert q.plan.fused_experts == tuple(f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                         for p in ("down_proj", "gate_up_proj"))
    assert "fused expert parameter(s)" in caplog.text and "stay 16-bit" in caplog.text
    assert q.plan.summary()["fused_experts_kept_16bit"] == 4
    expert_bytes = 2 * 4 * (2 * 512 * 256 + 256 * 512) * 2  # layers x experts x (gate_up + down) x bf16
    assert q.size_bytes > expert_bytes
