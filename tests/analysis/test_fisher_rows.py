"""Head rows drawn by Fisher mass: the Horvitz-Thompson estimate of a whole-vocabulary sum.

The truth is the sum over every row, computed here directly; the estimator must be unbiased and, when the
rows' shares follow their Fisher mass (Zipf-distributed, as a vocabulary's are), far less noisy than the
uniform row subset dq used before (which under-priced Qwen2.5-Coder's head ~4x, docs/results/qwen_output_head.md).
"""

from __future__ import annotations

import numpy as np

from dq.analysis.gradients import fisher_rows


def _zipf(v: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mass = 1.0 / np.arange(1, v + 1) ** 1.1
    rng.shuffle(mass)
    per_row = mass * rng.uniform(0.5, 1.5, v)  # a row's KL share: its mass times its own squared error
    return mass, per_row


def test_heaviest_rows_are_certain_and_the_count_is_the_budget():
    mass, _ = _zipf(20_000, 0)
    rows, pi = fisher_rows(mass, 400, seed=1)
    assert abs(len(rows) - 400) < 4 * np.sqrt(400)
    top = np.argsort(mass)[::-1][:50]
    assert set(top) <= set(rows.tolist())
    assert np.all(pi[np.isin(rows, top)] == 1.0)
    assert np.all((pi > 0) & (pi <= 1)) and np.all(np.diff(rows) > 0)


def test_all_rows_when_the_budget_covers_them():
    rows, pi = fisher_rows(np.ones(10), 10, seed=0)
    assert rows is None and np.all(pi == 1)


def test_unbiased_and_far_less_noisy_than_a_uniform_subset():
    v, budget = 20_000, 200
    mass, y = _zipf(v, 2)
    truth = y.sum()
    ht, uniform = [], []
    for s in range(300):
        rows, pi = fisher_rows(mass, budget, seed=s)
        ht.append((y[rows] / pi).sum())
        sub = np.random.default_rng(10_000 + s).choice(v, size=budget, replace=False)
        uniform.append(y[sub].sum() * v / budget)
    ht, uniform = np.array(ht), np.array(uniform)
    assert abs(ht.mean() / truth - 1) < 3 * ht.std() / truth / np.sqrt(len(ht)) + 1e-3
    assert ht.std() / truth < 0.05
    assert uniform.std() > 10 * ht.std()
    # the uniform subset's typical (median) draw misses the heavy rows and under-prices the sum
    assert np.median(uniform) < 0.8 * truth < np.median(ht)
