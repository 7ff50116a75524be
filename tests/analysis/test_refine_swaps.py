"""``--refine``'s measured swaps on a hand-built problem: the measured ΔKLD (not the damage model) decides.

The fake measure gives raising attn_q -0.05 KLD per step and lowering ffn_down +0.01, so with no slack
the only good move is the pair (raise attn_q, lower ffn_down): measured 0.10 - 0.05 + 0.01 = 0.06.
"""

from types import SimpleNamespace

from dq.analysis.allocate import Item, Option
from dq.analysis.refine import RefineStep, _swap_round
from dq.analysis.roles import TensorRole
from dq.quant.formats import QuantFormat as F

LADDER = (F.Q4_K, F.Q5_K, F.Q6_K)


def _item(name, role):
    # predicted damage *rises* with bytes here, as on a re-quantized base: the model would never raise
    return Item(name, role, tuple(Option(f, f, 100 * (i + 1), 0.001 * (i + 1)) for i, f in enumerate(LADDER)), "")


def _plan(types, budget):
    total = sum(100 * (LADDER.index(t) + 1) for t in types.values())
    return SimpleNamespace(explicit_types=lambda: dict(types), total_bytes=total, budget_bytes=budget,
                           predicted_damage=0.0)


def _kld(types):
    return 0.10 - 0.05 * (LADDER.index(types["q"]) - 1) + 0.01 * (1 - LADDER.index(types["d"]))


def _every_move_hurts(types):
    return 0.10 + 0.01 * abs(LADDER.index(types["q"]) - 1) + 0.01 * abs(LADDER.index(types["d"]) - 1)


def _run(budget, kld_of=_kld):
    items = [_item("q", TensorRole.ATTN_Q), _item("d", TensorRole.FFN_DOWN)]
    best = _plan({"q": F.Q5_K, "d": F.Q5_K}, budget)
    calls = []

    def measure(types):
        calls.append(dict(types))
        return kld_of(types)

    def make(picks):
        return _plan({n: o.fmt for n, o in picks.items()}, budget)

    steps: list[RefineStep] = []
    out, kld = _swap_round(best, 0.10, items, measure, make, steps, tries=2)
    return out, kld, steps, calls


def test_pair_move_found_by_measurement_with_no_slack():
    out, kld, steps, calls = _run(budget=400)
    assert len(calls) == 4 + 1  # two groups x up/down probes, then the winning pair
    assert out.explicit_types() == {"q": F.Q6_K, "d": F.Q4_K}
    assert out.total_bytes <= 400
    assert abs(kld - 0.06) < 1e-12
    assert steps[-1].what == "measured swap: raise attn_q + lower ffn_down"


def test_single_raise_when_the_budget_has_room():
    out, kld, steps, _ = _run(budget=500)
    assert out.explicit_types() == {"q": F.Q6_K, "d": F.Q5_K} and abs(kld - 0.05) < 1e-12


def test_no_move_when_nothing_measured_helps():
    out, kld, steps, calls = _run(budget=500, kld_of=_every_move_hurts)
    assert out.explicit_types() == {"q": F.Q5_K, "d": F.Q5_K} and kld == 0.10 and steps == [] and len(calls) == 4
