"""The ``flywheel`` command line.

Each command imports its heavy modules inside the function body so that ``flywheel --help``
answers in well under a second.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Rehearse a character-chat LLM improvement flywheel in simulation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
models_app = typer.Typer(help="Prepare the packaged default models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("prepare")
def models_prepare() -> None:
    """Convert the packaged SmolLM2 GGUF into a cached HF checkpoint and locate MiniLM."""
    from policies import models

    models.prepare_all(verbose=True)


if __name__ == "__main__":
    app()
