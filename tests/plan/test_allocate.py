"""The allocator: exact knapsack optimum (vs brute force), budgets, policy floors, plan files."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dq.analysis.artifact import Analysis, SuperWeight, TensorMeasurement, TypeError_
from dq.analysis.roles import TensorRole, classify, layer_index
from dq.errors import BudgetError, PlanError
from dq.plan.allocate import Item, Option, allocate, solve
from dq.plan.artifact import QuantPlan, tensor_fingerprint
from dq.plan.policy import Policy
from dq.quant.assign import SourceTensor
from dq.quant.formats import FORMATS, QuantFormat, effective_format, tensor_nbytes

Q = QuantFormat


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 50), st.floats(0, 10)), min_size=1, max_size=4),
                min_size=1, max_size=5), st.integers(0, 200))
def test_solve_matches_brute_force(items_spec, slack):
    items = [Item(f"t{i}", TensorRole.FFN_UP, tuple(Option(Q.Q8_0, Q.Q8_0, b, d) for b, d in opts), "")
             for i, opts in enumerate(items_spec)]
    capacity = sum(min(o.nbytes for o in it.options) for it in items) + slack
    best = min(
        sum(o.damage for o in combo)
        for combo in itertools.product(*[it.options for it in items])
        if sum(o.nbytes for o in combo) <= capacity
    )
    choice = solve(items, capacity)
    got = [it.options[c] for it, c in zip(items, choice)]
    assert sum(o.nbytes for o in got) <= capacity
    assert sum(o.damage for o in got) == pytest.approx(best, abs=1e-6 * max(1.0, best))


def _fake(names_shapes, sw_tensor=None) -> tuple[Analysis, list[SourceTensor]]:
    """An Analysis whose errors fall with bits per weight, for shapes that are 256-aligned."""
    cands = (Q.Q8_0, Q.Q6_K, Q.Q4_K, Q.Q3_K, Q.Q2_K, Q.IQ2_XXS, Q.IQ1_S)
    tensors, sources = [], []
    for name, shape in names_shapes:
        sources.append(SourceTensor(name, shape, Q.BF16 if len(shape) > 1 else Q.F32))
        if len(shape) < 2:
            continue
        errs = tuple(
            TypeError_(f, effective_format(f, shape), tensor_nbytes(effective_format(f, shape), shape),
                       weight_err=2.0 ** -(2 * FORMATS[f].bits_per_weight), act_err=2.0 ** -(2 * FORMATS[f].bits_per_weight),
                       kld=2.0 ** -(2 * FORMATS[f].bits_per_weight))
            for f in cands
        )
        tensors.append(TensorMeasurement(name, name, classify(name), layer_index(name), shape, errs))
    sws = (SuperWeight(sw_tensor, layer_index(sw_tensor), 0, 0, 100.0, 50.0, 500.0),) if sw_tensor else ()
    return Analysis("fake", "LlamaForCausalLM", cands, tuple(tensors), sws), sources


# shapes of a small Qwen2-MoE: 8 layers, 32 routed experts and one shared expert per layer
MOE = [("token_embd.weight", (1024, 256)), ("output.weight", (1024, 256)), ("output_norm.weight", (256,))] + [
    (f"blk.{i}.{n}", s) for i in range(8) for n, s in (
        ("attn_q.weight", (256, 256)), ("attn_k.weight", (256, 256)), ("attn_v.weight", (256, 256)),
        ("attn_output.weight", (256, 256)), ("attn_norm.weight", (256,)), ("ffn_gate_inp.weight", (32, 256)),
        ("ffn_gate_exps.weight", (32, 512, 256)), ("ffn_up_exps.weight", (32, 512, 256)),
        ("ffn_down_exps.weight", (32, 256, 512)), ("ffn_gate_shexp.weight", (512, 256)),
        ("ffn_up_shexp.weight", (512, 256)), ("ffn_down_shexp.weight", (256, 512)))
]


def _n(sources):
    return sum(math.prod(s.shape) for s in sources)


def test_moe_plan_respects_every_policy_floor_at_1_8_bpw():
    """The policy's floors hold in the solved plan: every tensor at or above its role's floor, the first
    shared down_proj layers and the super-weight expert tensor protected, router and norms kept."""
    analysis, sources = _fake(MOE, sw_tensor="blk.5.ffn_down_exps.weight")
    policy = Policy()
    budget = int(1.8 * _n(sources) / 8) + 4096
    plan = allocate(analysis, sources, budget, header_bytes=4096)
    t = plan.tensors
    assert plan.total_bytes <= budget
    assert t["output_norm.weight"].type is Q.F32 and t["output_norm.weight"].reason == "kept"
    assert t["blk.0.ffn_gate_inp.weight"].reason == "kept"  # the router stays as it is
    for name, p in t.items():
        if p.reason == "kept":
            continue
        floor = policy.floor_for(classify(name), layer_index(name), name == "blk.5.ffn_down_exps.weight")
        assert FORMATS[p.type].bits_per_weight >= FORMATS[floor].bits_per_weight, (name, p.type, floor)
    for name in ("blk.0.ffn_down_shexp.weight", "blk.1.ffn_down_shexp.weight"):
        assert FORMATS[t[name].type].bits_per_weight >= FORMATS[policy.protected_floor].bits_per_weight
    assert t["blk.5.ffn_down_exps.weight"].reason == "super weight"


def test_optimiser_alone_sends_routed_experts_lowest():
    """With every floor at the lowest type and no protection, the order comes from damage per byte: each
    tensor's predicted KLD per type is the same here, so the 32-expert tensors, which save 32x the bytes
    per step, go lowest and attention and shared experts stay above them."""
    analysis, sources = _fake(MOE)
    flat = Policy(role_floors={r: Q.IQ1_S for r in Policy().role_floors}, first_down_layers=0,
                  protect_super_weights=False)
    plan = allocate(analysis, sources, int(1.8 * _n(sources) / 8) + 4096, header_bytes=4096, policy=flat)
    bits = {n: FORMATS[p.type].bits_per_weight for n, p in plan.tensors.items()}
    routed = [bits[f"blk.{i}.ffn_{p}_exps.weight"] for i in range(8) for p in ("gate", "up", "down")]
    assert sum(b < 2.0 for b in routed) >= 0.75 * len(routed)
    for i in range(8):
        low = min(bits[f"blk.{i}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down"))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"):
            assert bits[f"blk.{i}.{n}.weight"] > low, (i, n)


def test_budget_below_smallest_file_names_the_smallest_size():
    analysis, sources = _fake(MOE)
    with pytest.raises(BudgetError, match=r"smallest achievable file .*: ([\d,]+) bytes"):
        allocate(analysis, sources, 10_000, header_bytes=4096)
    # and exactly that smallest size is feasible
    try:
        allocate(analysis, sources, 10_000, header_bytes=4096)
    except BudgetError as exc:
        smallest = int(str(exc).split(": ")[1].split(" bytes")[0].replace(",", ""))
    plan = allocate(analysis, sources, smallest, header_bytes=4096)
    assert plan.total_bytes == smallest


def test_more_budget_never_predicts_more_damage():
    analysis, sources = _fake(MOE)
    n = _n(sources)
    damages = [allocate(analysis, sources, int(b * n / 8) + 4096, header_bytes=4096).predicted_damage
               for b in (2.0, 3.0, 4.5, 6.0)]
    assert damages == sorted(damages, reverse=True)


def test_plan_file_round_trip_and_validation(tmp_path):
    analysis, sources = _fake(MOE)
    plan = allocate(analysis, sources, int(3 * _n(sources) / 8), header_bytes=4096)
    path = plan.save(tmp_path / "plan.yaml")
    again = QuantPlan.load(path)
    assert again.explicit_types() == plan.explicit_types() and again.total_bytes == plan.total_bytes
    again.check_model((s.name, s.shape) for s in sources)
    with pytest.raises(PlanError, match="does not have"):
        again.check_model((s.name, s.shape) for s in sources if s.name != "output.weight")
    other = [(s.name, s.shape if s.name != "output.weight" else (2048, 256)) for s in sources]
    with pytest.raises(PlanError, match="another model"):
        again.check_model(other)
    assert tensor_fingerprint(other) != plan.fingerprint
    text = path.read_text().replace("version: 2", "version: 2\nbogus: 3", 1)
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(PlanError, match="unknown keys"):
        QuantPlan.load(tmp_path / "bad.yaml")
    lines = plan.llama_quantize_args()
    assert len(lines) == sum(t.reason != "kept" for t in plan.tensors.values())
    want = plan.tensors["blk.0.attn_q.weight"].type.value.lower()
    assert f"--tensor-type '^blk\\.0\\.attn_q\\.weight$={want}'" in lines


def test_only_confirmed_super_weights_are_protected():
    analysis, sources = _fake(MOE, sw_tensor="blk.5.ffn_down_shexp.weight")
    sw = analysis.super_weights[0]
    import dataclasses

    weak = dataclasses.replace(analysis, super_weights=(dataclasses.replace(sw, ablation_ppl_ratio=1.01),))
    strong = dataclasses.replace(analysis, super_weights=(dataclasses.replace(sw, ablation_ppl_ratio=5.7),))
    budget = int(2.2 * _n(sources) / 8)
    protected = allocate(strong, sources, budget, header_bytes=4096).tensors["blk.5.ffn_down_shexp.weight"]
    assert protected.reason == "super weight"
    assert FORMATS[protected.type].bits_per_weight >= FORMATS[Policy().protected_floor].bits_per_weight
    assert allocate(weak, sources, budget, header_bytes=4096).tensors["blk.5.ffn_down_shexp.weight"].reason != "super weight"


def test_policy_from_dict_rejects_unknown_keys():
    with pytest.raises(PlanError, match="unknown keys"):
        Policy.from_dict({"role_floor": {}})
    p = Policy.from_dict({"role_floors": {"attn_v": "Q6_K"}, "first_down_layers": 0})
    assert p.floor_for(TensorRole.ATTN_V, 3, False) is Q.Q6_K
    assert p.floor_for(TensorRole.FFN_DOWN, 0, False) is Q.IQ1_S
