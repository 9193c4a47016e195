"""The generation loop, offline and online evaluation, the run store and the CLI."""
