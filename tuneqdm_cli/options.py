"""What every command shares: the storage and Ray-address options, exit statuses, and
options whose defaults live in the library's typed configs.

An option made with `config_option` is None unless given on the command line, so the
command passes on only what the user said and the config that declares the default
applies it (docs/design.md §5); `--help` shows that default, read from the config
when help is printed (no literal repeated here, nothing heavy imported at start-up).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import click

INPUT_ERROR = 2
INTERRUPTED = 130


def _parse_storage_options(ctx: click.Context, param: click.Parameter,
                           values: tuple[str, ...]) -> dict[str, Any]:
    from pipeline.store import parse_storage_options

    try:
        return parse_storage_options(values)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--storage-option") from None


storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    callback=_parse_storage_options,
    help="fsspec option for s3:// output and images, repeatable; e.g. "
         "endpoint_url=http://127.0.0.1:9000, profile=NAME, "
         "client_kwargs.region_name=... Credentials are refused here: they come from "
         "the usual AWS environment variables and files.")
address_option = click.option(
    "--address", default=None,
    help="Ray cluster: 'auto', ray://host:10001 or host:6379. Default: start a local Ray "
         "for this command.")


def default_of(target: str, name: str) -> Any:
    """The declared default of `name` in `target` ("package.module:Object"): a dataclass
    field, a pydantic model field, a keyword parameter of a function, or the attribute
    of a config instance (e.g. a module's Limits(...) constant)."""
    module, _, attribute = target.partition(":")
    owner = getattr(importlib.import_module(module), attribute)
    if dataclasses.is_dataclass(owner) and not isinstance(owner, type):
        return getattr(owner, name)
    if dataclasses.is_dataclass(owner):
        (field,) = [f for f in dataclasses.fields(owner) if f.name == name]
        return field.default
    model_fields = getattr(owner, "model_fields", None)
    if model_fields is not None:
        return model_fields[name].default
    return inspect.signature(owner).parameters[name].default


class ConfigOption(click.Option):
    """An option that is None unless given; --help shows what applies then."""

    def __init__(self, *decls: str, fallback: Callable[[], str], **attrs: Any) -> None:
        super().__init__(*decls, default=None, **attrs)
        self.fallback = fallback

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        extra["default"] = self.fallback()
        return extra


def config_option(*decls: str, source: str, name: str | None = None, prefix: str = "",
                  show: Callable[[Any], str] = str, **attrs: Any) -> Callable:
    """click.option whose default is `source`'s field `name` (default: the option's
    own name), shown in --help as `prefix` + show(default), e.g. "the base's recipe,
    else 400"."""
    long = next(d for d in decls if d.startswith("--")).split("/")[0]
    option_name = name or long[2:].replace("-", "_")

    def fallback() -> str:
        return prefix + show(default_of(source, option_name))

    return click.option(*decls, cls=ConfigOption, fallback=fallback, **attrs)


def given(**options: Any) -> dict[str, Any]:
    """The options the user gave (not None), to pass on as keyword arguments."""
    return {key: value for key, value in options.items() if value is not None}
