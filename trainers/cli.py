"""``python -m trainers <command>``: the pack's command line.

Each command lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
a command's module is imported only when that command runs, so ``--help`` stays fast and one
command's optional dependency never breaks another.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from .bench import BENCHMARKS
from .methods import METHODS

# name -> (module under trainers/, one-line description); the lists come from their registries
COMMANDS: dict[str, tuple[str, str]] = {
    "annotate": ("annotate", "detect faces and hands in a folder of images; write masks and metadata.jsonl"),
    "train": ("train", f"train a LoRA or a ControlNet: --method {' | '.join(METHODS)}"),
    "build-pairs": ("build_pairs", "generate N images per prompt, score them, keep best/worst pairs"),
    "sample": ("sample", "generate images with a base model, optional LoRA, optional LAN"),
    "evaluate": ("evaluate", "compare a base with LoRAs: Face/Hand Confi., color shift, scores, win rates; an HTML report"),
    "report": ("report", "plot a run's losses, weights and DPO margins from its events.jsonl"),
    "bench": ("bench", f"benchmarks: {', '.join(BENCHMARKS)}"),
    "demo": ("demo", "the end-to-end demo on the embedded tiny model; writes outputs/"),
    "models": ("models_setup", "set up the mediapipe face/hand model files (from the mediapipe 0.10.21 wheel)"),
    "job": ("node_job", "run a ComfyUI training node's job from its spec (annotate/build-pairs, train, export)"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<12} {desc}" for name, (_, desc) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="python -m trainers",
        description="Trainers and tools of the FairHuman / HG-DPO node pack.",
        epilog=f"commands:\n{lines}\n\n'python -m trainers COMMAND --help' shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def load_command(name: str):
    """The module implementing a command."""
    return importlib.import_module(f"{__package__}.{COMMANDS[name][0]}")


def build_parser(name: str, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m trainers {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _top_parser().parse_args([name])  # prints the usage error, exits 2
    module = load_command(name)
    args = build_parser(name, module).parse_args(rest)
    # The command as typed, for reports that record how they were made (also when called in-process).
    args.command_line = "python -m trainers " + " ".join(shlex.quote(str(a)) for a in argv)
    return int(module.run(args) or 0)
