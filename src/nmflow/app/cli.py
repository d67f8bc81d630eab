"""The ``nmflow`` command: parses the command line and hands over to the module of each subcommand.

    nmflow train [--method M] [--sparsity ROLE=N:M ...] [--steps T] [--config FILE] ...
    nmflow train --resume DIR      # continue the run in DIR from its newest checkpoint
    nmflow sweep SPEC.yaml --out DIR [--jobs K]   # a grid of runs, several at once (see nmflow.app.sweep)
    nmflow report DIR              # markdown tables and plots of the runs in DIR (see nmflow.app.report)
    nmflow generate RUN_DIR --prompt TEXT   # text from a language model, dense vs deployed N:M (nmflow.app.generate)

Errors in the input end the command with one line, ``nmflow: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any, NoReturn

from nmflow.core.errors import ConfigError, NmflowError
from nmflow.core.masks import NMPattern
from nmflow.core.recipes import ROLES

__all__ = ["main"]

EXIT_USAGE = 2  # bad input, as argparse does
EXIT_FAILURE = 1


class _Parser(argparse.ArgumentParser):
    """Reports usage errors on one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"nmflow: error: {message} (see '{self.prog} --help')\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="nmflow", description="N:M structured-sparse training with progressive gradient flow.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_command(commands)
    _add_sweep_command(commands)
    _add_report_command(commands)
    _add_generate_command(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:
        return _fail(err, EXIT_USAGE)
    except NmflowError as err:
        return _fail(err, EXIT_FAILURE)


def _fail(err: Exception, status: int) -> int:
    print(f"nmflow: error: {err}", file=sys.stderr)
    return status


# ----------------------------------------------------------------------------- nmflow train
def _add_train_command(commands: Any) -> None:
    from nmflow.app.config import RECIPE_OPTIONS, TrainConfig

    command = commands.add_parser(
        "train",
        help="train a small ViT (images) or GPT-2 (text) under an N:M recipe",
        description="Train a small ViT on images (scikit-learn's bundled digits by default) or a byte-level GPT-2 "
        "on text (CPython's pydoc text by default) under an N:M recipe, check the realized pattern and save the "
        "model. Flags override --config.",
        argument_default=argparse.SUPPRESS,  # only the flags given reach the config, over the file's values
    )
    command.add_argument("--config", metavar="FILE", help="YAML file with the keys of these flags, underscored")
    default_sparsity = " ".join(f"{role}={pattern}" for role, pattern in TrainConfig().sparsity.items())
    command.add_argument(
        "--sparsity",
        action="append",
        type=_role_pattern,
        metavar="ROLE=N:M",
        help=f"target pattern of a role ({', '.join(ROLES)}, re:<regex> on module names); repeat for several "
        f"roles; any given replaces the default {default_sparsity}",
    )
    recipe_group = command.add_argument_group("recipe options", "passed on to nmflow.Recipe, with its defaults")
    recipe_group.add_argument(
        "--exclude",
        action="append",
        metavar="REGEX",
        help="leave the layers whose full module name matches REGEX (re.fullmatch) dense; repeat for several",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in ("sparsity", "exclude") or not f.metadata.get("cli", True):  # those two are added above
            continue
        group = recipe_group if f.name in RECIPE_OPTIONS else command
        flag, kind = "--" + f.name.replace("_", "-"), _scalar_type(hints[f.name])
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            # a default other than False (None: "decide for me") gets a --no- form too
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            group.add_argument(flag, action=action, help=help_text)
            continue
        if f.default not in (MISSING, None):
            help_text += f" (default: {f.default})"
        group.add_argument(
            flag, type=kind, choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"), help=help_text
        )
    command.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    command.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in output folder DIR from its newest checkpoint, with the config of its "
        "config.yaml; only --save-every, --keep-checkpoints and --(no-)tensorboard may be given with it",
    )
    command.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from nmflow.app.config import TrainConfig, config_from_file, resume_config
    from nmflow.app.train import train

    given = vars(args)
    flags = {k: v for k, v in given.items() if k not in ("command", "run", "config", "overwrite", "resume")}
    if "resume" in given:
        refused = [name for name in ("config", "overwrite") if name in given]
        if refused:
            raise ConfigError(f"--resume takes the run's own config.yaml; --{refused[0]} cannot be given with it")
        train(resume_config(given["resume"], flags), resume=True)
        return 0
    if "sparsity" in flags:
        flags["sparsity"] = _sparsity_mapping(flags["sparsity"])
    config = config_from_file(given["config"], flags) if "config" in given else TrainConfig.from_dict(flags)
    train(config, overwrite=given.get("overwrite", False))
    return 0


# ----------------------------------------------------------------------------- nmflow sweep, nmflow report
def _add_sweep_command(commands: Any) -> None:
    command = commands.add_parser(
        "sweep",
        help="train a grid of tasks x methods x patterns x seeds",
        description="Train every run of a sweep spec (YAML; see nmflow.app.sweep), several processes at once. "
        "Finished runs are skipped, interrupted ones resumed, failed ones retried.",
    )
    command.add_argument("spec", metavar="SPEC", help="the sweep spec, a YAML file")
    command.add_argument("--out", required=True, metavar="DIR", help="folder of the runs (one subfolder each)")
    command.add_argument("--jobs", type=int, metavar="K", help="runs at once (default: one per CPU core)")
    command.add_argument("--dry-run", action="store_true", help="check the spec and list the runs; train nothing")
    command.set_defaults(run=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from nmflow.app.sweep import plan_sweep, read_spec, run_sweep

    if args.dry_run:
        runs = plan_sweep(read_spec(args.spec))
        for run in runs:
            print(run.name)
        print(f"{len(runs)} runs")
        return 0
    counts = run_sweep(args.spec, args.out, jobs=args.jobs)
    return EXIT_FAILURE if counts["failed"] else 0


def _add_report_command(commands: Any) -> None:
    command = commands.add_parser(
        "report",
        help="write a markdown report with tables and plots of the runs in a folder",
        description="Collect every run below RUNS_DIR and write report.md (mean +- std over seeds per task, "
        "pattern and method) with PNG plots into plots/.",
    )
    command.add_argument("runs_dir", metavar="RUNS_DIR", help="a sweep's output folder")
    command.add_argument("--out", metavar="DIR", help="where report.md and plots/ go (default: RUNS_DIR)")
    command.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from nmflow.app.report import write_report

    path = write_report(args.runs_dir, args.out)
    print(f"nmflow report: {path}")
    return 0


def _add_generate_command(commands: Any) -> None:
    from nmflow.app.generate import add_arguments

    add_arguments(
        commands.add_parser(
            "generate",
            help="generate text with a finalized language model, dense and deployed N:M, and compare tokens/s",
            description="Load a language run (or an HF causal LM folder), generate greedily with the dense model, "
            "deploy it with nmflow.deploy, generate again, and print the text and both speeds.",
        )
    )


def _role_pattern(text: str) -> tuple[str, str]:
    """``"ff=1:16"`` -> ``("ff", "1:16")``; the role itself is checked by the recipe."""
    role, sep, pattern = text.rpartition("=")  # a regex role may hold "=", a pattern never does
    if not sep or not role.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not ROLE=N:M, e.g. ff=1:16")
    try:
        NMPattern.parse(pattern)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return role.strip(), pattern.strip()


def _sparsity_mapping(pairs: list[tuple[str, str]]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for role, pattern in pairs:
        if role in mapping:
            raise ConfigError(f"--sparsity gives role {role!r} twice ({mapping[role]} and {pattern})")
        mapping[role] = pattern
    return mapping


def _scalar_type(hint: Any) -> type:
    """``int``, ``float``, ``str`` or ``bool`` out of a field's type, ``X | None`` included."""
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
    return options[0]
