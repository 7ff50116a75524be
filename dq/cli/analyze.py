"""``dq analyze``: measure a model (imatrix, per-tensor x type errors and bytes, super weights).

Example:
    dq analyze smollm2-135m -o out/smollm2 --tokens 8192
    dq analyze MODEL_DIR -o out/m --candidates Q4_K,Q3_K,IQ2_XXS --resume --json
    dq analyze MODEL_DIR -o out/m --device cuda --nproc 8         # = torchrun --nproc-per-node 8 -m dq analyze ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="measure per-tensor quantization error, importance matrix and super weights")
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model directory or packaged model name (default: smollm2-135m)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output directory")
    from dq.analysis.measure import DEFAULT_CANDIDATES

    p.add_argument("--candidates", default=None,
                   help=f"comma-separated GGML types to measure (default: {','.join(f.value for f in DEFAULT_CANDIDATES)})")
    p.add_argument("--calib", default=None, help="calibration text file (default: packaged C4+code+multilingual+technical)")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--chat-template", action="store_true", help="wrap calibration samples in the chat template")
    p.add_argument("--act-tokens", type=int, default=512, help="tokens kept per tensor for activation error")
    p.add_argument("--grad-tokens", type=int, default=8192,
                   help="calibration tokens (whole sequences) that carry a KL probe through the backward sweep: "
                        "the damage model's sample (default 8192: every calibration sequence is a probe)")
    p.add_argument("--max-elements", type=int, default=1 << 21,
                   help="measure errors on at most this many weights per tensor (seeded row subset; 0 = all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-super-weights", action="store_true", help="skip super-weight detection and ablation")
    p.add_argument("--ablation-tokens", type=int, default=1024, help="held-out tokens for ablation (default 1024)")
    p.add_argument("--response-tokens", type=int, default=2048,
                   help="calibration tokens on which each role's measured response to quantization is taken, "
                        "for the planner's response factors (default 2048; 0 skips it)")
    p.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    p.add_argument("--threads", type=int, default=None, help="quantizer threads")
    p.add_argument("--resume", action="store_true", help="skip blocks finished by an interrupted run in --out")
    p.add_argument("--nproc", type=int, default=None,
                   help="run as N processes on this node under torchrun (one per GPU with --device cuda; gloo on "
                        "CPUs): the same as `torchrun --nproc-per-node N -m dq analyze ...`")
    p.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds a process waits for the others at a collective before the job fails (default 1800)")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON instead of a table")
    p.set_defaults(func=run)


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Re-start this command as ``nproc`` processes under torchrun (``--nproc`` dropped from ``argv``)."""
    import os

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dq", *rest]
    os.execv(sys.executable, cmd)
    return 1  # not reached


def run(args: argparse.Namespace) -> int:
    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.analysis.measure import parse_candidates
    from dq.analysis.ranks import Ranks, launched_by_torchrun
    from dq.analysis.report import summary_table
    from dq.errors import AnalysisError

    if args.nproc is not None and args.nproc < 1:
        raise AnalysisError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc is not None and args.nproc > 1 and not launched_by_torchrun():
        return _torchrun(args.nproc, args.argv)

    opts = AnalyzeOptions(
        candidates=parse_candidates(args.candidates), calib_file=args.calib, n_tokens=args.tokens,
        seq_len=args.seq_len, chat_template=args.chat_template, act_tokens=args.act_tokens,
        max_elements=args.max_elements or None, device=args.device, super_weights=not args.no_super_weights,
        ablation_tokens=args.ablation_tokens, response_tokens=args.response_tokens, plots=not args.no_plots,
        n_threads=args.threads,
        grad_tokens=args.grad_tokens,
    )
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}
    labels = {"forward": "forward sweep (imatrix, spikes)", "measure": "backward sweep (gradients, errors)"}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=labels.get(stage, stage), unit="layer", file=sys.stderr,
                                     disable=None)
        bar.update(done - bar.n)

    ranks = Ranks.from_env(opts.device, args.dist_timeout)
    try:
        analysis = analyze(args.model, args.out, opts, resume=args.resume, progress=progress, ranks=ranks)
    finally:
        for bar in bars.values():
            bar.close()
        ranks.close()
    if analysis is None:  # another rank than 0: rank 0 writes and prints
        return 0
    if args.json:
        json.dump(analysis.to_dict(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(summary_table(analysis))
        print(f"wrote {args.out}/analysis.json, imatrix.gguf, *.csv, *.png")
    return 0
