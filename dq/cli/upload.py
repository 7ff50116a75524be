"""``dq upload``: publish a quant (GGUF file(s) or a safetensors directory) to the Hugging Face Hub.

Creates the repo if needed and uploads the model files with the plan, imatrix, eval reports and a
generated model card (README.md), in one commit; large files go first and resume file by file when
the command is run again. The token comes from --token, HF_TOKEN or `hf auth login`.

Examples:
    dq upload out/smollm2-Q4_K_M.gguf --repo me/SmolLM2-135M-dq-GGUF --dry-run
    dq upload out/smollm2-dyn-nf4 --repo me/SmolLM2-135M-dq-bnb-4bit --base-model HuggingFaceTB/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("dq.cli.upload")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upload", help="upload a quant with its model card to the Hugging Face Hub",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a quantized .gguf, a directory of them, or a safetensors quant directory")
    p.add_argument("--repo", required=True, help="target repository, namespace/name")
    p.add_argument("--base-model", default=None, help="Hub id of the base model for the card (default: inferred)")
    p.add_argument("--quantized-by", default=None, help="card's quantized_by (default: the repo's namespace)")
    p.add_argument("--imatrix", type=Path, action="append", default=[], help="importance matrix file to include")
    p.add_argument("--plan", type=Path, default=None, help="plan JSON to include (found beside the quant by default)")
    p.add_argument("--eval", type=Path, action="append", default=[], dest="evals",
                   help="dq eval report (JSON) whose results go in the card's files table")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--dry-run", action="store_true", help="print every operation and write the card locally; upload nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dq.hub.upload import plan_upload, upload

    plan = plan_upload(args.path, args.repo, base_model=args.base_model, quantized_by=args.quantized_by,
                       imatrix=args.imatrix, plan=args.plan, evals=args.evals, private=args.private)
    log.info("model card: %s", plan.card_path)
    out = {"repo": plan.repo_id, "card": str(plan.card_path), "dry_run": args.dry_run,
           "operations": plan.describe(), "files": [f.path_in_repo for f in plan.files]}
    if args.dry_run:
        if args.json:
            json.dump(out, sys.stdout, indent=1)
            print()
        else:
            for line in plan.describe():
                print(line)
            print(f"model card written to {plan.card_path} (dry run: nothing uploaded)")
        return 0

    def progress(i: int, n: int, name: str) -> None:
        log.info("[%d/%d] uploaded %s", i, n, name)

    url = upload(plan, token=args.token, progress=progress)
    out["commit_url"] = url
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print(url)
    return 0
