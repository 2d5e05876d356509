"""The console script's entry point. The command line (and torch with it) is imported inside
the guard, so that Ctrl-C or SIGTERM at any moment, start-up included, ends in one line."""

import os
import signal
import sys

from many_cli.errors import Terminated


def _terminate(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    # MKL may choose its code path by memory alignment and its thread count by itself: both fixed,
    # so that the same input gives the same bytes from run to run (Intel's reproducibility settings).
    os.environ.setdefault("MKL_CBWR", "AUTO")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    try:
        from many_cli.cli import main as run
    except KeyboardInterrupt:
        print("many: error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("many: error: terminated", file=sys.stderr)
        sys.exit(143)
    run()
