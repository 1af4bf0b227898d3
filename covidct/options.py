"""Command-line flags generated from a config dataclass, and the config read back from them.

Each field of ``TrainConfig`` / ``PretrainConfig`` is declared with ``option(default, help, ...)``;
its metadata gives the flag its help text, choices and metavar:

    epochs: int = option(40, "number of epochs")                 ->  --epochs N  (default 40)
    schedule: str = option("cosine", "...", choices=SCHEDULES)    ->  --schedule {none,step,cosine}
    skip_bad: bool = option(False, "...")                         ->  --skip-bad
    extra_data: tuple = option((), "...")                         ->  --extra-data A --extra-data B
    progress: bool = option(True, "...")                          ->  --no-progress

``add_config_arguments(parser, Config)`` adds one flag per field; every flag's
argparse default is None ("not given"), so ``config_from_args(Config, args)``
knows which options the user typed: those override the dataclass defaults,
and with ``--resume`` only RESUME_OPTIONS may be changed. A field declared
without metadata (plain ``name: int = 3``) still gets a flag.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, field, fields
from pathlib import Path

from .errors import CovidCTError

RESUME_OPTIONS = ("epochs", "device", "progress", "cache_dir")   # what --resume RUN may change


def option(default, help: str = "", *, choices=None, metavar: str | None = None, cli: bool = True):
    """A dataclass field with its command-line description (``cli=False``: no flag)."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar, "cli": cli})


def flag_name(name: str, default) -> str:
    return f"--no-{name.replace('_', '-')}" if default is True else f"--{name.replace('_', '-')}"


def field_type(config_field):
    """int, float, str or bool, from the default or from the annotation ("int | None" -> int)."""
    if config_field.default is not None and config_field.default is not MISSING:
        return type(config_field.default)
    annotation = str(config_field.type)
    return next((kind for kind in (int, float, bool) if annotation.startswith(kind.__name__)), str)


def add_config_arguments(parser: argparse.ArgumentParser, config_class, help_overrides: dict | None = None) -> None:
    """One flag per field of ``config_class`` (see the module docstring); argparse defaults are all None."""
    help_overrides = help_overrides or {}
    for config_field in fields(config_class):
        meta = config_field.metadata
        if not meta.get("cli", True):
            continue
        default, kind = config_field.default, field_type(config_field)
        text = help_overrides.get(config_field.name, meta.get("help", ""))
        if isinstance(default, tuple):                     # a repeatable flag: --extra-data A --extra-data B
            parser.add_argument(f"--{config_field.name.replace('_', '-')}", dest=config_field.name, action="append",
                                default=None, metavar=meta.get("metavar"), help=text)
            continue
        if kind is bool:
            parser.add_argument(flag_name(config_field.name, default), dest=config_field.name, action="store_const",
                                const=not default, default=None, help=text)
            continue
        if default not in (None, "", MISSING) and "%(default)" not in text and "default:" not in text:
            text = f"{text} (default: {default})".strip()
        parser.add_argument(f"--{config_field.name.replace('_', '-')}", dest=config_field.name, type=kind,
                            default=None, choices=meta.get("choices"), metavar=meta.get("metavar"), help=text)


def given_options(config_class, args) -> dict:
    """{field: value} for the options typed on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(config_class) if getattr(args, f.name, None) is not None}


def config_from_args(config_class, args):
    """A TrainConfig / PretrainConfig from parsed arguments.

    Without --resume: the dataclass defaults, changed by what was typed. With ``--resume RUN``:
    the config saved in RUN/config.json, changed only by RESUME_OPTIONS.
    """
    given = given_options(config_class, args)
    if getattr(args, "resume", None):
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise CovidCTError(f"--resume {args.resume}: no config.json there; is it a covidct run directory?")
        try:
            values = json.loads(saved.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CovidCTError(f"{saved}: not a readable run config ({error})") from None
        refused = sorted(set(given) - set(RESUME_OPTIONS))
        if refused:
            raise CovidCTError(f"--resume {args.resume} continues the run with its saved options; "
                               f"{', '.join('--' + n.replace('_', '-') for n in refused)} "
                               f"cannot change (only {', '.join('--' + n.replace('_', '-') for n in RESUME_OPTIONS)})")
        known = {f.name for f in fields(config_class)}
        values = {k: v for k, v in values.items() if k in known}
        for name, before in getattr(config_class, "ADDED_LATER", {}).items():
            values.setdefault(name, before)                  # a run saved before the option: as it trained
        values.update(given, out=args.resume)
        return config_class(**values)
    return config_class(**given)
