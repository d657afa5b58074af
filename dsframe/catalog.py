"""``python -m dsframe list``: what is installed, one line each."""
from __future__ import annotations

from dsframe import registry


def recipes() -> list[tuple[str, str]]:
    """Options of the ``recipe`` config group (also those added by other packages' search paths)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    rows = []
    with initialize_config_module("dsframe.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for name in loader.get_group_options("recipe"):
            try:
                cfg = compose("config", overrides=[f"recipe={name}"])
                rows.append((name, str(cfg.recipe.get("description", ""))))
            except Exception as exc:  # one broken recipe file must not hide the others
                rows.append((name, f"BROKEN: {type(exc).__name__}: {str(exc).splitlines()[0]}"))
    GlobalHydra.instance().clear()
    return rows


def print_catalog() -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    # a pipe gets 80 columns from rich: wide enough that an import error stays on one line
    console = Console(width=None if sys.stdout.isatty() else 120)
    sections = [("recipes", recipes())] + [(kind, reg.describe()) for kind, reg in registry.ALL.items()]
    for kind, rows in sections:
        table = Table(title=kind, title_justify="left", show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for name, description in rows:
            table.add_row(name, description)
        reg = registry.ALL.get(kind)
        for broken in reg.broken() if reg else []:
            table.add_row(f"{broken.name}", f"[red]failed to import ({broken.target}): {broken.error}[/red]")
        if not rows and not (reg and reg.broken()):
            table.add_row("(none)", "")
        console.print(table)
        console.print()
