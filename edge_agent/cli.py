"""edge-agent: enroll memory banks, score recordings, evaluate on DCASE data, run the monitoring daemon."""

from __future__ import annotations

import os

# Before numpy loads: ONNX Runtime's thread pool owns the cores. numpy's OpenBLAS threads (resampling,
# exact kNN) spinning beside it made every window ~2.4x slower on 2 cores (docs/benchmarks.md,
# "thread oversubscription"). An explicit OPENBLAS_NUM_THREADS in the environment still wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent import __version__
from edge_agent.errors import EdgeAsdError

log = logging.getLogger("edge_agent")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except EdgeAsdError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-asd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from edge_agent import cli_offline

    cli_offline.add_commands(commands)
    try:
        from edge_agent import daemon
    except ImportError as exc:  # pragma: no cover - only while the agent is being built
        log.debug("run command unavailable: %s", exc)
    else:
        run = commands.add_parser("run", help="run the monitoring daemon (edge-agent run --config FILE)")
        daemon.add_run_arguments(run)
        run.set_defaults(handler=lambda args: daemon.run_from_args(args))
    return parser


def print_json_line(data: object) -> None:
    print(json.dumps(data, sort_keys=True), flush=True)


def existing_path(value: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file or directory")
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
