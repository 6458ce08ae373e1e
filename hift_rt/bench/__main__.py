"""`python -m hift_rt.bench SUBCOMMAND [options]`: the benchmarks.

Each subcommand is a module with `add_arguments(parser)` and `main(args) -> exit code`; adding
one is one line in SUBCOMMANDS. The modules are imported to build the parser, so they keep heavy
imports (models, datasets) inside main().

Owns: the `python -m hift_rt.bench` parser. May call: the subcommand modules.
"""
import argparse
import importlib

SUBCOMMANDS = {
    "kernels": "hift_rt.bench.kernels",
    "engine": "hift_rt.bench.engine",
    "finetune": "hift_rt.bench.finetune",
    "fidelity": "hift_rt.bench.fidelity",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hift_rt.bench", description=__doc__.split("\n")[0])
    subcommands = parser.add_subparsers(dest="subcommand", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        subparser = subcommands.add_parser(name, help=module.__doc__.split("\n")[0],
                                           description=module.__doc__)
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.main)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
