"""The ``segany`` command line.

Adding a subcommand: put a module in this package (e.g. ``segany/cli/train.py``) that defines

    def add_parser(subparsers) -> argparse.ArgumentParser:
        p = subparsers.add_parser("train", help="...")
        p.add_argument(...)
        p.set_defaults(func=run)
        return p

    def run(args: argparse.Namespace) -> int: ...   # the exit status

:mod:`segany.cli.main` finds it by itself (every public module here with an ``add_parser``), so no
shared file needs editing. Keep imports of torch and heavy extras inside ``run`` so ``segany --help``
stays fast. Raise :class:`segany.errors.SeganyError` subclasses for user mistakes: ``main`` prints
their message as one line and exits 1 (``--debug`` shows the traceback). Print results to stdout and
progress to stderr (see :mod:`segany.cli._util`).
"""
