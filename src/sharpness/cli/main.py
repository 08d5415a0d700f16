"""The ``sharpness`` command: train, compare, report, demo, and the sharpness analyses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sharpness import __version__
from sharpness.cli import analysis, demo, training

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharpness",
        description="Sharpness-Aware Minimization (Foret et al., ICLR 2021): run the paper's experiments, "
        "report them as mean ± 95% CI over seeds, and measure the sharpness of trained models.",
    )
    parser.add_argument("--version", action="version", version=f"sharpness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training.register(sub)
    demo.register(sub)
    analysis.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from sharpness.harness.config import ConfigError
    from sharpness.harness.rundir import RunDirError, describe_os_error
    from sharpness.harness.train import Interrupted, RunDirBusy, RunDirExists, TrainingDiverged

    try:
        return int(args.handler(args) or 0)
    except Interrupted as exc:
        print(f"sharpness: {exc}", file=sys.stderr)
        return 128 + exc.signum  # as the shell reports a process the signal ended: 143 (SIGTERM), 130 (SIGINT)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves a checkpoint and raises Interrupted)
        print(
            f"sharpness {args.command}: interrupted (SIGINT); continue with the same command (train: add --resume)",
            file=sys.stderr,
        )
        return 130
    except TrainingDiverged as exc:
        print(f"sharpness: training diverged: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, RunDirExists, RunDirBusy, RunDirError, FileNotFoundError, ValueError) as exc:
        print(f"sharpness {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # an optional extra a config asks for (decoder: dali, .safetensors), in one line
        print(f"sharpness {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or network operation outside a run directory's own (theirs are RunDirError)
        message = str(exc) if exc.errno is None else describe_os_error(exc, "access")
        print(f"sharpness {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
