"""Streamlit dashboards, read-only over a run store (``flywheel dashboard RUN_DIR``)."""

from pathlib import Path

APP_PATH = Path(__file__).resolve().parent / "app.py"
