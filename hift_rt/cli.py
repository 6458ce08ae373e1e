"""Command line: `python -m hift_rt <command>` (also installed as `hift-rt`).

  finetune   fine-tune a causal LM with hift_rt (with no options: a small random Llama on
             Python's own documentation text; see --help)
  info       how hift_rt._C was built and which transfer backend runs here, and why
"""
import argparse
import json
import sys


def _info(args) -> int:
    import torch

    from .engine import TransferEngine, probe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with TransferEngine(device) as engine:
        report = {"torch": torch.__version__, "probe": probe(), "engine": engine.info()}
    print(json.dumps(report, indent=1))
    return 0


def _finetune(args) -> int:
    from . import finetune

    try:
        finetune.check_arguments(args)
        return finetune.main(args)
    except finetune.JobError as exc:
        print(f"hift-rt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv=None) -> int:
    from . import finetune

    parser = argparse.ArgumentParser(prog="hift-rt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="how hift_rt._C was built and which transfer backend runs here, and why")
    ft = sub.add_parser("finetune", help="fine-tune a causal LM with hift_rt", description=finetune.__doc__)
    finetune.add_arguments(ft)
    args = parser.parse_args(argv)
    return {"info": _info, "finetune": _finetune}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
