"""Typed options, declared once: a dataclass field per option, with its help, choices and range.

Each stage's config (:class:`dpnet.extract.config.ExtractConfig`, :class:`dpnet.train.params.FitParams`,
:class:`dpnet.analyze.config.AnalyzeConfig`) declares its options with :func:`option`; its checks
(:func:`check_fields`) and its command line (:func:`add_arguments`, :func:`given`) are made from
those fields, so a new option is its field and the code that uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Callable

from .errors import check_options


class Parser(argparse.ArgumentParser):
    """argparse, whose refusals are one line (the option and what it takes) and a pointer to --help,
    not the whole usage."""

    def error(self, message: str):  # noqa: D102 - argparse's
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def option(default: Any = None, help: str = "", *, choices: tuple | None = None,
           check: Callable[[Any], bool] | None = None, want: str = "", flags: tuple[str, ...] = (),
           make: str | None = None, cli: bool = True, factory: Callable[[], Any] | None = None, **extra: Any) -> Any:
    """An option's field.

    Args:
        default: its value when not given (``factory`` for a mutable one).
        help: the ``--help`` text.
        choices: the values it may take (checked, and offered by argparse).
        check: a test of a value, with ``want`` the range it stands for in an error.
        flags: extra command-line spellings (``--q`` for ``parts_per_class``).
        make: its Makefile variable, named first in errors (``REGIONS (--regions)``).
        cli: whether :func:`add_arguments` gives it a command-line option.
        extra: more metadata a stage reads (``module`` in train).
    """
    meta = {"help": help, "choices": choices, "check": check, "want": want, "flags": flags, "make": make,
            "cli": cli, **extra}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag(f: dataclasses.Field) -> str:
    """The option's command-line name: ``--image-size`` for ``image_size``."""
    return "--" + f.name.replace("_", "-")


def label(f: dataclasses.Field) -> str:
    """How an error names the option: ``REGIONS (--regions)``, or ``--shard-mb`` without a make variable."""
    return f"{f.metadata['make']} ({flag(f)})" if f.metadata.get("make") else flag(f)


def check_fields(obj: Any, fields: tuple[dataclasses.Field, ...] | None = None,
                 label_of: Callable[[dataclasses.Field], str] = label) -> None:
    """Every option of ``obj`` within its choices or range, else a ConfigError naming the first that is not.

    Raises:
        ConfigError: naming the option (its make variable and flag) and what it takes.
    """
    checks = []
    for f in fields or dataclasses.fields(obj):
        v, meta = getattr(obj, f.name), f.metadata
        if f.type in (bool, "bool"):
            ok, want = isinstance(v, bool), "true or false"
        elif meta.get("choices"):
            ok, want = v in meta["choices"], f"one of {', '.join(map(str, meta['choices']))}"
        elif meta.get("check"):
            try:
                ok = bool(meta["check"](v))
            except TypeError:
                ok = False
            want = meta["want"]
        else:
            continue
        checks.append((label_of(f), v, ok, want))
    check_options(checks)


def converter(tp: Any) -> Callable[[str], Any]:
    """A string -> value function for an annotation (int, float, str, bool, X | None, tuple[T, ...])."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner_type = next(a for a in typing.get_args(tp) if a is not type(None))
        inner = converter(inner_type)
        if typing.get_origin(inner_type) is tuple:  # "none" is the empty list, not "unset"
            return inner
        return lambda s: None if s.lower() in ("none", "") else inner(s)
    if origin is tuple:
        item = typing.get_args(tp)[0]

        def items(s: str) -> tuple:
            if s.strip().lower() in ("", "none"):
                return ()
            try:
                return tuple(item(x.strip()) for x in s.split(",") if x.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item.__name__}, or none; "
                                                 f"got {s!r}") from None
        items.__name__ = f"list of {item.__name__}"
        return items
    if tp is bool:
        return boolean
    return tp


def boolean(text: str) -> bool:
    """1/true/yes/on or 0/false/no/off; anything else is refused (argparse names the option)."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (1/0, yes/no, on/off), got {text!r}")


boolean.__name__ = "boolean"


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  defaults: Callable[[dataclasses.Field], str] | None = None, switches: bool = True) -> None:
    """One ``--name-with-dashes`` option per field of ``cls`` with ``cli`` set, unset by default (so the
    config's own default applies). With ``switches`` a boolean is ``--name`` / ``--no-name``, else it
    takes a value (``--name true``). ``defaults`` says a field's default in its help (default:
    ``repr`` of the field's)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        default = defaults(f) if defaults else repr(f.default)
        text = f"{meta['help']} (default {default})".replace("%", "%%")
        names = [flag(f), *meta.get("flags", ())]
        if switches and hints[f.name] in (bool, bool | None, typing.Optional[bool]):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        parser.add_argument(*names, dest=f.name, type=_naming(converter(hints[f.name]), label(f)), default=None,
                            metavar=(meta.get("make") or f.name.upper()), choices=meta.get("choices"), help=text)


def _naming(convert: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """``convert``, whose refusals name the option as errors do (``DENSE (--dense): ...``)."""
    def run(text: str) -> Any:
        try:
            return convert(text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{name}: {exc}") from None
    run.__name__ = getattr(convert, "__name__", "value")
    return run


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.metadata.get("cli") and getattr(args, f.name, None) is not None}


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed options, or the exit code argparse chose (2 for a refused option, 0 for --help) as a
    number to return: a command's ``main`` returns it rather than raising SystemExit into its caller."""
    try:
        return parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
