"""`dq analyze --device cuda` (Triton kernels) against the CPU path (libggml): same error table, and times.

Subcommands (the GPU machine gets the model through a 64 MiB carry limit, hence ``pack``/``unpack``):

- ``pack``: SmolLM2-135M truncated to its first ``--layers`` decoder layers (real weights, embedding and
  tied head included), bf16 split into byte planes with the high plane lzma-compressed (the low,
  mantissa plane does not compress), plus config, tokenizer and the calibration text used by both runs.
- ``unpack``: rebuild the Hugging Face directory (bit-identical weights) from a ``pack`` folder.
- ``random``: the same config and tokenizer with seeded random weights (transformers' init), since the
  packaged SmolLM2 is dequantized from a Q4_1 GGUF (its weights sit on Q4_1 grids).
- ``run``: ``analyze`` on ``--device``; writes the error table, wall time and the time spent in
  ``measure_tensor`` (the part the kernels replace) as JSON.
- ``quantizer``: the quantizers alone on every 2-D weight of the model, same rows, no imatrix:
  libggml on the CPU vs the kernel path on ``--device`` (errors and time per tensor).
- ``shaped``: a model with real shapes and seeded random weights, built on ``--device``: ``llama3-8b``
  (Llama-3-8B's config) or ``mixtral-8x7b`` (its config, ``--layers`` layers), with a given tokenizer
  (the converter pads the vocabulary to the config's).
- ``full``: the full ``dq analyze`` with its defaults (every default candidate, super weights, damage
  gradients) on ``--device``; writes per-stage wall times, peak GPU memory and peak host RSS as JSON.
- ``report``: compare the JSONs of a cuda and a cpu ``run`` (+ ``quantizer``) into a markdown file.

Usage (see docs/results/analyze_gpu_vs_cpu.md for the commands of the recorded run):
    python bench/analyze_gpu.py pack --layers 4 --out .devcarry/smollm2
    python bench/analyze_gpu.py unpack --src .devcarry/smollm2 --dst /tmp/smollm2-4l
    python bench/analyze_gpu.py run --model /tmp/smollm2-4l --device cuda --json gpu.json
    python bench/analyze_gpu.py report --gpu gpu.json --cpu cpu.json --quantizer q.json --out out.md
"""

from __future__ import annotations

import argparse
import json
import logging
import lzma
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CANDIDATES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "TQ2_0", "TQ1_0",
              "IQ4_XS")
_TEXT_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def pack(layers: int, out: Path, model: str = "smollm2-135m", calib_chars: int = 400_000) -> None:
    import torch
    from safetensors.torch import load_file

    from dq.data import calibration_text
    from dq.models import materialize

    src = Path(materialize(model))
    out.mkdir(parents=True, exist_ok=True)
    sd = load_file(src / "model.safetensors")
    arrays: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        if k.startswith("model.layers.") and int(k.split(".")[2]) >= layers:
            continue
        assert v.dtype == torch.bfloat16, (k, v.dtype)
        b = v.contiguous().view(torch.int16).numpy().view(np.uint8).reshape(-1, 2)
        arrays[f"{k}|hi"] = np.frombuffer(lzma.compress(b[:, 1].tobytes(), preset=6), dtype=np.uint8)
        arrays[f"{k}|lo"] = np.ascontiguousarray(b[:, 0])
        arrays[f"{k}|shape"] = np.array(v.shape, dtype=np.int64)
    np.savez(out / "weights.npz", **arrays)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    for name in _TEXT_FILES:
        if (src / name).is_file():
            (out / name).write_text((src / name).read_text())
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "tokenizer.json.xz").write_bytes(lzma.compress((src / "tokenizer.json").read_bytes()))
    (out / "calib.txt").write_text(calibration_text()[:calib_chars])


def unpack(src: Path, dst: Path) -> None:
    import torch
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    with np.load(src / "weights.npz") as z:
        names = sorted({k.rsplit("|", 1)[0] for k in z.files})
        for n in names:
            hi = np.frombuffer(lzma.decompress(z[f"{n}|hi"].tobytes()), dtype=np.uint8)
            b = np.stack([z[f"{n}|lo"], hi], axis=1).reshape(-1)
            t = torch.from_numpy(b.view(np.int16).copy()).view(torch.bfloat16)
            tensors[n] = t.reshape(tuple(int(s) for s in z[f"{n}|shape"]))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    for name in _TEXT_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    (dst / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))


def run(model: Path, device: str, out_json: Path, calib: Path, tokens: int, candidates: tuple[str, ...],
        repeat: int = 1) -> dict:
    """``analyze`` ``repeat`` times in this process (the first pays Triton's JIT/cache load); last one's table."""
    import torch

    import dq.analysis.analyze as A

    spent = {"measure_s": 0.0, "calls": 0}
    inner = A.measure_tensor

    def timed(*a, **k):
        t0 = time.perf_counter()
        r = inner(*a, **k)
        if str(k.get("device", "cpu")).startswith("cuda"):
            torch.cuda.synchronize()
        spent["measure_s"] += time.perf_counter() - t0
        spent["calls"] += 1
        return r

    A.measure_tensor = timed
    opts = A.AnalyzeOptions(candidates=candidates, calib_file=str(calib), n_tokens=tokens, seq_len=512, act_tokens=512,
                            device=device, super_weights=False, plots=False)
    runs = []
    for i in range(repeat):
        spent.update(measure_s=0.0, calls=0)
        out_dir = Path(tempfile.gettempdir()) / f"dq-analyze-{out_json.stem}-{i}"  # not under $OUT: 8 files come back
        t0 = time.perf_counter()
        a = A.analyze(model, out_dir, opts)
        runs.append({"wall_s": round(time.perf_counter() - t0, 2), "measure_s": round(spent["measure_s"], 2),
                     "measure_calls": spent["calls"]})
    A.measure_tensor = inner
    res = {
        "device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        **runs[-1], "runs": runs, "n_tokens": a.n_tokens, "candidates": list(candidates),
        "tensors": {t.name: {"shape": list(t.shape), "errors": [e.to_dict() for e in t.errors]} for t in a.tensors},
    }
    out_json.write_text(json.dumps(res, indent=1))
    return res


def random_model(src: Path, dst: Path, layers: int, seed: int = 0) -> None:
    """SmolLM2-135M's config with ``layers`` layers and seeded random weights (transformers' init), bf16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    for name in _TEXT_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    (dst / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))
    cfg = AutoConfig.from_pretrained(dst)
    cfg.num_hidden_layers = layers
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(dst)


SHAPES = {
    "llama3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      tie_word_embeddings=False),
    "mixtral-8x7b": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, rope_theta=1e6,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def shaped_model(shape: str, tokenizer: Path, dst: Path, layers: int | None, device: str, seed: int = 0) -> None:
    """``SHAPES[shape]`` (``layers`` decoder layers if given) with seeded random weights, bf16, in 2 GB shards;
    the vocabulary is at least the tokenizer's (Mixtral's 32,000 grows to SmolLM2's 49,152)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, dst / name)
    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    n_tok = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    kw["vocab_size"] = max(kw["vocab_size"], n_tok)
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(dst, max_shard_size="2GB")


def full(model: Path, out: Path, device: str, out_json: Path, candidates: tuple[str, ...] | None = None,
         n_threads: int | None = None) -> dict:
    """``dq analyze`` with its defaults (or these ``candidates``, libggml on ``n_threads``); stage times from
    the analysis, peak memory of this process."""
    import resource

    import torch

    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.convert.source import source_gguf

    t0 = time.perf_counter()
    source_gguf(model)  # llama.cpp's converter (analyze would run it first; timed apart)
    t1 = time.perf_counter()
    kw = {"candidates": candidates} if candidates else {}
    a = analyze(model, out, AnalyzeOptions(device=device, plots=False, n_threads=n_threads, **kw))
    wall = time.perf_counter() - t0
    cuda = device.startswith("cuda")
    res = {"model": model.name, "device": device, "gpu": torch.cuda.get_device_name() if cuda else None,
           "wall_s": round(wall, 1), "convert_s": round(t1 - t0, 1), "stage_seconds": a.extra.get("stage_seconds"),
           "candidates": a.extra["options"]["candidates"], "n_tokens": a.n_tokens, "tensors": len(a.tensors),
           "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
           "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    out_json.write_text(json.dumps(res, indent=1))
    return res


def quantizer(model: Path, device: str, out_json: Path, candidates: tuple[str, ...], max_elements: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from dq.analysis.measure import MatrixInput, measure_tensor, parse_candidates

    fmts = parse_candidates(list(candidates))
    sd = load_file(model / "model.safetensors")
    rows = {}
    t_cpu = t_dev = 0.0
    for name, v in sorted(sd.items()):
        if v.ndim != 2:
            continue
        w = v.float().numpy()
        mats = [MatrixInput(w)]
        t0 = time.perf_counter()
        ref = measure_tensor(mats, w.shape, fmts, max_elements=max_elements, kernels=False)
        t1 = time.perf_counter()
        got = measure_tensor(mats, w.shape, fmts, max_elements=max_elements, device=device, kernels=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        t_cpu += t1 - t0
        t_dev += t2 - t1
        rows[name] = [{"requested": r.requested.value, "stored": r.stored.value, "cpu": r.weight_err,
                       "kernel": g.weight_err} for r, g in zip(ref, got)]
    res = {"device": device, "libggml_s": round(t_cpu, 2), "kernel_path_s": round(t_dev, 2), "tensors": rows}
    out_json.write_text(json.dumps(res, indent=1))
    return res


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return abs(a - b) / abs(b) if b else abs(a - b)


def report(gpu: dict, cpu: dict, q: dict | None) -> str:
    from dq.analysis.measure import kernel_formats

    kern = {f.value for f in kernel_formats()}
    by_stored: dict[str, dict[str, list]] = {}
    for name, t in cpu["tensors"].items():
        for ec, eg in zip(t["errors"], gpu["tensors"][name]["errors"]):
            assert ec["stored"] == eg["stored"] and ec["nbytes"] == eg["nbytes"]
            d = by_stored.setdefault(ec["stored"], {"w": [], "im": [], "act": [], "ratio_im": [], "n": []})
            d["n"].append(name)
            d["w"].append(_rel(eg["weight_err"], ec["weight_err"]))
            d["im"].append(_rel(eg["weighted_err"], ec["weighted_err"]))
            d["act"].append(_rel(eg["act_err"], ec["act_err"]))
            if eg["weighted_err"] is not None and ec["weighted_err"]:
                d["ratio_im"].append(eg["weighted_err"] / ec["weighted_err"])

    def mx(v):
        v = [x for x in v if x is not None]
        return f"{max(v):.2e}" if v else "-"

    lines = [
        "| stored type | measured on (cuda run) | tensor x type cells | max rel. diff weight_err | max rel. diff "
        "weighted_err | max rel. diff act_err | weighted_err GPU/CPU (min-median-max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for st in sorted(by_stored, key=lambda s: (s not in kern, s)):
        d = by_stored[st]
        r = sorted(d["ratio_im"])
        rs = f"{r[0]:.3f} / {r[len(r) // 2]:.3f} / {r[-1]:.3f}" if r else "-"
        lines.append(f"| {st} | {'GPU kernels' if st in kern else 'libggml (CPU)'} | {len(d['n'])} | {mx(d['w'])} | "
                     f"{mx(d['im'])} | {mx(d['act'])} | {rs} |")
    out = ["\n".join(lines)]
    if q is not None:
        worst: dict[str, float] = {}
        for cells in q["tensors"].values():
            for c in cells:
                worst[c["stored"]] = max(worst.get(c["stored"], 0.0), _rel(c["kernel"], c["cpu"]) or 0.0)
        qs = ["| stored type | max rel. diff weight_err, kernel path vs libggml (no imatrix, same rows) |", "|---|---|"]
        qs += [f"| {k} | {v:.2e} |" for k, v in sorted(worst.items())]
        out.append("\n".join(qs))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("unpack")
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--dst", type=Path, required=True)
    p = sub.add_parser("run")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--repeat", type=int, default=1)
    p = sub.add_parser("random")
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--dst", type=Path, required=True)
    p.add_argument("--layers", type=int, default=8)
    p = sub.add_parser("quantizer")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--max-elements", type=int, default=1 << 21)
    p = sub.add_parser("shaped")
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json")
    p.add_argument("--dst", type=Path, required=True)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("full")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--candidates", default=None, help="comma-separated (default: dq analyze's)")
    p.add_argument("--threads", type=int, default=None, help="libggml threads (default: CPUs, at most 8)")
    p = sub.add_parser("report")
    p.add_argument("--gpu", type=Path, required=True)
    p.add_argument("--cpu", type=Path, required=True)
    p.add_argument("--quantizer", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "pack":
        pack(a.layers, a.out)
    elif a.cmd == "unpack":
        unpack(a.src, a.dst)
    elif a.cmd == "run":
        r = run(a.model, a.device, a.json, a.calib, a.tokens, tuple(a.candidates.split(",")), a.repeat)
        print(json.dumps({k: v for k, v in r.items() if k != "tensors"}))
    elif a.cmd == "random":
        random_model(a.src, a.dst, a.layers)
    elif a.cmd == "shaped":
        shaped_model(a.shape, a.tokenizer, a.dst, a.layers, a.device)
    elif a.cmd == "full":
        cands = tuple(a.candidates.split(",")) if a.candidates else None
        print(json.dumps(full(a.model, a.out, a.device, a.json, cands, a.threads)))
    elif a.cmd == "quantizer":
        r = quantizer(a.model, a.device, a.json, tuple(a.candidates.split(",")), a.max_elements)
        print(json.dumps({k: v for k, v in r.items() if k != "tensors"}))
    else:
        q = json.loads(a.quantizer.read_text()) if a.quantizer else None
        print(report(json.loads(a.gpu.read_text()), json.loads(a.cpu.read_text()), q))
    return 0


if __name__ == "__main__":
    sys.exit(main())
