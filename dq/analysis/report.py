"""Tables and plots of an :class:`~dq.analysis.artifact.Analysis`: CSV files, PNGs, a terminal summary.

Plots use matplotlib's Agg backend through an explicit ``Figure`` (no pyplot state), so writing them is
safe from any thread and never opens a window.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from dq.analysis.artifact import Analysis
from dq.quant.formats import QuantFormat

__all__ = ["write_report", "write_csvs", "write_plots", "summary_table", "role_layer_errors"]


def write_report(analysis: Analysis, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """Write every CSV (and PNG when ``plots``) into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    paths = write_csvs(analysis, out_dir)
    if plots:
        paths += write_plots(analysis, out_dir)
    return paths


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    from dq.atomic import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    return path


def write_csvs(analysis: Analysis, out_dir: Path) -> list[Path]:
    rows = []
    for t in analysis.tensors:
        for e in t.errors:
            rows.append([t.name, t.role.value, "" if t.layer is None else t.layer, "x".join(map(str, t.shape)),
                         e.requested.value, e.stored.value, e.nbytes, f"{8 * e.nbytes / t.n_elements:.4f}",
                         e.weight_err, "" if e.weighted_err is None else e.weighted_err,
                         "" if e.act_err is None else e.act_err])
    p1 = _write_csv(out_dir / "errors.csv", ["tensor", "role", "layer", "shape", "requested", "stored", "bytes", "bpw",
                                              "weight_err", "weighted_err", "act_err"], rows)
    p2 = _write_csv(out_dir / "tensors.csv", ["tensor", "hf_name", "role", "layer", "shape", "n_elements", "max_abs"], [
        [t.name, t.hf_name, t.role.value, "" if t.layer is None else t.layer, "x".join(map(str, t.shape)),
         t.n_elements, t.max_abs] for t in analysis.tensors])
    p3 = _write_csv(out_dir / "super_weights.csv", ["tensor", "layer", "expert", "row", "col", "value", "input_spike",
                                                     "output_spike", "ablation_ppl_ratio", "ablation_kld"], [
        [s.tensor, s.layer, "" if s.expert is None else s.expert, s.row, s.col, s.value, s.input_spike,
         s.output_spike, s.ablation_ppl_ratio, s.ablation_kld] for s in analysis.super_weights])
    spikes = analysis.extra.get("spikes", [])
    keys = ["tensor", "layer", "expert", "row", "col", "value", "in_col", "input_spike", "output_spike",
            "in_ratio", "out_ratio", "share", "token"]
    p4 = _write_csv(out_dir / "spikes.csv", keys, [[s.get(k) for k in keys] for s in spikes])
    return [p1, p2, p3, p4]


def role_layer_errors(analysis: Analysis, fmt: QuantFormat, kind: str = "act_err") -> dict[str, dict[int, float]]:
    """role -> layer -> error of ``kind`` (``weight_err``/``weighted_err``/``act_err``) for type ``fmt``."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for t in analysis.tensors:
        e = t.error_for(fmt)
        if e is None or t.layer is None:
            continue
        v = getattr(e, kind)
        if v is not None:
            out[t.role.value][t.layer] = v
    return dict(out)


def _figure(n_panels: int):
    from matplotlib.figure import Figure

    cols = min(4, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def write_plots(analysis: Analysis, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    paths = []
    for kind, label in (("weight_err", "relative weight error"), ("act_err", "relative activation error")):
        fig, axes = _figure(len(analysis.candidates))
        for ax, fmt in zip(axes, analysis.candidates):
            for role, by_layer in sorted(role_layer_errors(analysis, fmt, kind).items()):
                xs = sorted(by_layer)
                ax.plot(xs, [max(by_layer[x], 1e-12) for x in xs], marker=".", label=role)
            ax.set_yscale("log")
            ax.set_title(f"{fmt.value}")
            ax.set_xlabel("layer")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        if axes:
            axes[0].legend(fontsize=7)
        fig.suptitle(f"{analysis.model}: {label} per layer and role")
        path = out_dir / f"{kind}_by_layer.png"
        fig.savefig(path, dpi=90)
        paths.append(path)
    paths.append(_super_weight_map(analysis, out_dir))
    return paths


def _super_weight_map(analysis: Analysis, out_dir: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    spikes = analysis.extra.get("spikes", [])
    by_layer_out: dict[int, float] = defaultdict(float)
    by_layer_in: dict[int, float] = defaultdict(float)
    for s in spikes:
        by_layer_out[s["layer"]] = max(by_layer_out[s["layer"]], s["output_spike"])
        by_layer_in[s["layer"]] = max(by_layer_in[s["layer"]], s["input_spike"])
    xs = sorted(by_layer_out)
    ax1.semilogy(xs, [by_layer_out[x] for x in xs], marker="o", label="max |down_proj output|")
    ax1.semilogy(xs, [by_layer_in[x] for x in xs], marker="s", label="max |down_proj input|")
    for sw in analysis.super_weights:
        ax1.annotate(f"L{sw.layer}[{sw.row},{sw.col}]\nppl x{sw.ablation_ppl_ratio or float('nan'):.2f}",
                     (sw.layer, sw.output_spike), fontsize=7, color="red")
    ax1.set_xlabel("layer")
    ax1.set_title("down-projection spikes per layer")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    if spikes:
        sc = ax2.scatter([s["col"] for s in spikes], [s["row"] for s in spikes], c=[s["layer"] for s in spikes],
                         s=[8 + 60 * min(1.0, s["out_ratio"] / 100) for s in spikes], cmap="viridis")
        fig.colorbar(sc, ax=ax2, label="layer")
    for sw in analysis.super_weights:
        ax2.scatter([sw.col], [sw.row], marker="x", color="red", s=80)
        ax2.annotate(f"L{sw.layer}", (sw.col, sw.row), fontsize=8, color="red")
    ax2.set_xlabel("input channel (col)")
    ax2.set_ylabel("output channel (row)")
    ax2.set_title("peak weight per down_proj; x = super weight")
    path = out_dir / "super_weights.png"
    fig.savefig(path, dpi=90)
    return path


def summary_table(analysis: Analysis) -> str:
    """A fixed-width table: per candidate type, bytes, bits per weight and element-weighted mean errors."""
    lines = [f"{analysis.model} ({analysis.architecture}), {len(analysis.tensors)} tensors, "
             f"{analysis.n_tokens} calibration tokens",
             f"{'type':<8} {'stored as':<22} {'MiB':>9} {'bpw':>6} {'weight_err':>11} {'wtd_err':>11} {'act_err':>11}"]
    for fmt in analysis.candidates:
        nbytes = n = 0
        sums = {"weight_err": [0.0, 0], "weighted_err": [0.0, 0], "act_err": [0.0, 0]}
        stored: dict[str, int] = defaultdict(int)
        for t in analysis.tensors:
            e = t.error_for(fmt)
            if e is None:
                continue
            nbytes += e.nbytes
            n += t.n_elements
            stored[e.stored.value] += t.n_elements
            for k in sums:
                v = getattr(e, k)
                if v is not None:
                    sums[k][0] += v * t.n_elements
                    sums[k][1] += t.n_elements
        st = ",".join(k for k, _ in sorted(stored.items(), key=lambda kv: -kv[1]))[:22]
        cells = [f"{s / c:11.3e}" if c else f"{'-':>11}" for s, c in sums.values()]
        lines.append(f"{fmt.value:<8} {st:<22} {nbytes / 2**20:9.2f} {8 * nbytes / max(n, 1):6.3f} " + " ".join(cells))
    if analysis.super_weights:
        lines.append("super weights (ablation on held-out text):")
        for s in analysis.super_weights:
            ex = f" expert {s.expert}" if s.expert is not None else ""
            lines.append(f"  {s.tensor}{ex} [{s.row}, {s.col}] = {s.value:+.3g}  in {s.input_spike:.3g} "
                         f"out {s.output_spike:.3g}  ppl x{s.ablation_ppl_ratio:.3f}  KLD {s.ablation_kld:.4f}")
    acts = analysis.extra.get("super_activations", [])
    if acts:
        chans = sorted({a["channel"] for a in acts})
        lines.append(f"super activations: channel(s) {chans} in {len(acts)} layer outputs "
                     f"(max {max(a['max_abs'] for a in acts):.3g})")
    return "\n".join(lines)
