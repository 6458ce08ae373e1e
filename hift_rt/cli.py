"""Command line: `python -m hift_rt <command>` (also installed as `hift-rt`).

  finetune   fine-tune a causal LM with hift_rt (with no options: a small random Llama on
             Python's own documentation text; see --help)
  info       how hift_rt._C was built and which transfer backend runs here, and why

Owns: the command line's parser and the mapping of a job's failure to one `hift-rt: error:` line
(exit code 2; under torchrun from rank 0 only, every rank exiting with 2) and of Ctrl-C to exit code
130. May call: hift_rt.job, hift_rt.engine.
"""
import argparse
import contextlib
import io
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
    from . import job

    try:
        return job.main(args)
    except job.JobError as exc:
        if job.launched_rank() == 0:  # under torchrun every rank ends with the same error
            print(f"hift-rt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


@contextlib.contextmanager
def _quiet_unless(shown: bool):
    """Within `with`: stdout and stderr go nowhere unless `shown`."""
    if shown:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _for_users(doc: str) -> str:
    """A module docstring without its "Owns: ... May call: ..." paragraph (that is for readers of
    the code, not of --help)."""
    return doc.split("\nOwns:")[0].rstrip()


def main(argv=None) -> int:
    from . import job

    parser = argparse.ArgumentParser(prog="hift-rt", description=_for_users(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="how hift_rt._C was built and which transfer backend runs here, and why")
    ft = sub.add_parser("finetune", help="fine-tune a causal LM with hift_rt", description=_for_users(job.__doc__))
    job.add_arguments(ft)
    with _quiet_unless(job.launched_rank() == 0):  # torchrun: --help and usage errors once, from rank 0
        args = parser.parse_args(argv)
    return {"info": _info, "finetune": _finetune}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
