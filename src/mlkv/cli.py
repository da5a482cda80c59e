"""The ``mlkv`` command: dispatch to the command modules, and one error boundary.

Each command lives with its subpackage and exposes ``add_<name>_arguments(parser)`` and ``run_<name>_command(args)``;
this file only lists them, imports the one being run (so ``mlkv plan`` and every ``--help`` stay light), and turns
the errors a user can act on into one line, ``mlkv <command>: error: ...``, with exit code 2 (``--debug`` shows the
traceback instead).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from importlib.metadata import PackageNotFoundError, version

from mlkv.diskspace import disk_full
from mlkv.errors import UsageError

#: name -> (module, one-line purpose, example lines)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "plan": ("mlkv.model.commands", "show sharing plans and their KV-cache bytes per token",
             ("mlkv plan", "mlkv plan --layers 30 --heads 9 --kv-heads 3")),
    "convert": ("mlkv.model.commands", "convert a Hugging Face checkpoint to a sharing plan",
                ("mlkv convert path/to/pythia-160m runs/mlkv6 --plan mlkv-6",)),
    "train": ("mlkv.training.command", "pretrain, uptrain or distill a model",
              ("mlkv train --model runs/mlkv6 --data ../shared/data/corpus/gutenberg/train_00.jsonl.xz "
               "--tokens 20M --out runs/mlkv6-up",)),
    "eval": ("mlkv.evaluation.command", "zero-shot tasks (lm-evaluation-harness) and perplexity",
             ("mlkv eval runs/mlkv6-up --tasks piqa arc_easy --perplexity gutenberg --max-tokens 200000",)),
    "generate": ("mlkv.inference.generate", "continue prompts with a checkpoint",
                 ("mlkv generate runs/mlkv6-up --prompt 'The old house' --engine fast",)),
    "bench": ("mlkv.inference.bench.command", "decode speed, memory and max batch per plan",
              ("mlkv bench pythia-160m --plans MHA-144 MLKV-6 --batch 1 64",)),
    "reproduce": ("mlkv.reproduce.command", "the paper's experiment end to end",
                  ("mlkv reproduce --smoke --out runs/smoke",)),
    "export": ("mlkv.export.command", "a checkpoint that loads with transformers alone",
               ("mlkv export runs/mlkv6-up runs/mlkv6-up-portable",)),
}


def _version() -> str:
    try:
        return version("mlkv")
    except PackageNotFoundError:  # running from a source tree without an install
        from mlkv import __version__

        return __version__


def _epilog() -> str:
    lines = ["examples:"]
    lines += [f"  {example}" for _, _, examples in COMMANDS.values() for example in examples[:1]]
    lines += ["", "Each command's own --help lists its flags, their defaults and examples."]
    return "\n".join(lines)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported and given its flags."""
    parser = argparse.ArgumentParser(
        prog="mlkv", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog(),
        description="Multi-Layer Key-Value sharing (MLKV): convert, uptrain, evaluate and serve transformers that "
                    "share K/V heads across layers.")
    parser.add_argument("--version", action="version", version=f"mlkv {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, purpose, examples) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=purpose)
            continue
        mod = importlib.import_module(module)
        run = getattr(mod, f"run_{name}_command")
        epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
        p = sub.add_parser(name, help=purpose, description=(run.__doc__ or purpose).strip(), epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
        getattr(mod, f"add_{name}_arguments")(p)
        if p.epilog != epilog:  # the command set its own closing text: the examples come after it
            p.epilog = f"{p.epilog}\n\n{epilog}"
        p.set_defaults(func=run)
    return parser


def describe_error(err: BaseException) -> str | None:
    """The one-line message for an error a user can act on, or None for a bug (which keeps its traceback)."""
    if disk_full(err):
        where = f" writing {err.filename}" if isinstance(err, OSError) and err.filename else ""
        return f"no space left on the device{where}: free some disk space (or write elsewhere) and run again"
    if isinstance(err, (UsageError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                        PermissionError, json.JSONDecodeError, UnicodeDecodeError)):
        return str(err)
    if isinstance(err, ValueError):
        return str(err)
    if type(err).__name__.startswith("StrictDataclass"):  # a config field of the wrong type, over two lines
        return " ".join(str(err).split())
    if type(err).__name__ in ("SafetensorError", "HeaderTooLarge"):
        return f"a weights file is corrupt or truncated ({err}); rewrite it with the command that made it"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"mlkv {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the boundary: known kinds become one line, bugs re-raise)
        message = describe_error(err)
        if message is None or getattr(args, "debug", False):
            raise
        print(f"mlkv {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
