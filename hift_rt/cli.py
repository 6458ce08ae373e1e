"""Command line: `python -m hift_rt <command>` (also installed as `hift-rt`)."""
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hift-rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="how hift_rt._C was built and which transfer backend runs here, and why")
    args = parser.parse_args(argv)
    return {"info": _info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
