"""The ``gptoss`` command line: one subcommand per stage of the workflow (DESIGN §5)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gptoss.errors import GptOssError

log = logging.getLogger("gptoss")
COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str) -> Callable:
    def register(fn: Callable[[argparse.Namespace], int | None]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return register


@command("synth")
def _synth(args: argparse.Namespace) -> None:
    from gptoss.synth import synthesize

    cfg = synthesize(args.output, args.preset, args.layers, args.seed, args.layout)
    log.info(
        "wrote %s checkpoint (%d layers, %.3f B params) to %s",
        args.preset,
        cfg.num_hidden_layers,
        cfg.param_count() / 1e9,
        args.output,
    )


@command("download")
def _download(args: argparse.Namespace) -> None:
    from gptoss.hub import download

    download(args.repo_id, args.revision, args.output, args.retries)


@command("convert")
def _convert(args: argparse.Namespace) -> None:
    from gptoss.convert import convert

    convert(args.checkpoint, args.output, args.layers, args.dtype)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic HF-layout checkpoint (MXFP4 experts, tokenizer.json)")
    p.add_argument("--preset", default="toy", choices=["toy", "gpt-oss-20b", "gpt-oss-120b"])
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="hf", choices=["hf", "original"], help="tensor naming to write")
    p.add_argument("--output", type=Path, required=True, help="checkpoint folder to create")

    p = sub.add_parser("download", help="snapshot a checkpoint from the Hugging Face Hub")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--revision", default="main", help="branch, tag or commit (pin a commit for reproducibility)")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--retries", type=int, default=3)

    p = sub.add_parser("convert", help="checkpoint folder -> Flax params msgpack + .config.json")
    p.add_argument("--checkpoint", type=Path, required=True, help="HF or original/ layout checkpoint folder")
    p.add_argument("--output", type=Path, required=True, help="X.msgpack (X.config.json is written next to it)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])

    for register in _EXTRA_PARSERS:
        register(sub)
    return parser


# Later stages (export, parity, gate, promote) register their parsers here.
_EXTRA_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a ``GptOssError`` becomes one line on stderr and exit status 1."""
    _load_stage_commands()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    start = time.perf_counter()
    try:
        status = COMMANDS[args.command](args) or 0
    except GptOssError as exc:
        print(f"gptoss {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gptoss {args.command}: interrupted", file=sys.stderr)
        return 130
    log.info("%s finished in %.1f s", args.command, time.perf_counter() - start)
    return status


def _load_stage_commands() -> None:
    """Import the modules that add subcommands beyond synth/download/convert, if present."""
    import importlib

    for module in ("gptoss.export_cli", "gptoss.parity_cli", "gptoss.gate_cli", "gptoss.promote_cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


if __name__ == "__main__":
    sys.exit(main())
