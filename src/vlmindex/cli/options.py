"""Options shared by several commands, each with one meaning everywhere (sqlite-utils style).

``-m/--model`` always takes one name or a comma-separated list; ``--checkpoint``,
``--trust-remote-code`` and ``--device`` always mean how the model is loaded
(:class:`vlmindex.models.LoadOptions`); ``-d/--dataset`` and ``-c/--condition`` always name the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from vlmindex.models import LoadOptions

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def names(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``."""
    return [m.strip() for m in text.split(",") if m.strip()]


def _split_names(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    out = names(value)
    if not out:
        raise click.BadParameter("give at least one model name")
    return out


def models_option(*, required: bool = True, help: str = "Model name(s), comma-separated (see `vlmindex models`).",
                  ) -> Decorator:
    """``-m/--model NAME[,NAME...]``, passed to the command as ``models: list[str]``."""
    return click.option("--model", "-m", "models", required=required, callback=_split_names, help=help)


def dataset_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--dataset", "-d", required=True, help="Dataset name (see `vlmindex datasets`).")(func)


def condition_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--condition", "-c", default="clean", show_default=True,
                        help="Overlay condition (see `vlmindex overlay list`); clean = no overlay.")(func)


def family_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--family``: what kind of model made the vectors, stored with the run (``vlmindex findings``)."""
    from vlmindex.models.registry import FAMILIES

    return click.option("--family", type=click.Choice(FAMILIES), default=None,
                        help="The model's family, stored with the run for `vlmindex findings` (default: the "
                        "registry's; needed for imported and local models).")(func)


def load_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--checkpoint``, ``--trust-remote-code`` and ``--device``, passed as ``load: LoadOptions``."""

    def wrapper(*args: Any, checkpoint: str | None, trust_remote_code: bool, device: str | None,
                **kwargs: Any) -> Any:
        return func(*args, load=LoadOptions(checkpoint=checkpoint, trust_remote_code=trust_remote_code,
                                            device=device), **kwargs)

    wrapper.__name__, wrapper.__doc__ = func.__name__, func.__doc__
    wrapper.__click_params__ = getattr(func, "__click_params__", [])  # type: ignore[attr-defined]
    for option in (
        click.option("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow models whose weights come with their own Python code (LLM2CLIP) to run it."),
        click.option("--checkpoint", type=click.Path(exists=True), default=None,
                     help="Load weights from this folder (the model's own layout) instead of the cache."),
    ):
        wrapper = option(wrapper)
    return wrapper
