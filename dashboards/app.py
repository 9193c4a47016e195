"""The CharacterFlywheel dashboard: ``flywheel dashboard RUN_DIR`` runs this script.

``streamlit run dashboards/app.py -- --run-dir RUN_DIR`` works too (or set
``$FLYWHEEL_RUN_DIR``). The sidebar field switches to another run directory. Every page is
read-only over the run (see ``dashboards.data``).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboards import data

VIEWS = Path(__file__).resolve().parent / "views"
PAGES = (
    ("overview.py", "Overview", ":material/insights:"),
    ("ab_detail.py", "A/B detail", ":material/science:"),
    ("twins.py", "Twins vs standard", ":material/compare_arrows:"),
    ("sequential.py", "Sequential monitoring", ":material/timeline:"),
    ("reward_models.py", "Reward models", ":material/target:"),
    ("style_artifacts.py", "Style artifacts", ":material/palette:"),
    ("conversations.py", "Conversations", ":material/forum:"),
    ("fidelity.py", "Simulated-user fidelity", ":material/groups:"),
)

st.set_page_config(page_title="CharacterFlywheel", page_icon=":material/cyclone:", layout="wide")
data.current_run_dir()  # seeds the sidebar field from --run-dir / $FLYWHEEL_RUN_DIR
with st.sidebar:
    st.text_input(
        "Run directory",
        key=data.RUN_DIR_KEY,
        help="A folder written by `flywheel run` or `flywheel ab` (holds run.duckdb).",
    )
    st.caption("Read-only: the dashboard never writes to the run.")
pages = [
    st.Page(VIEWS / name, title=title, icon=icon, default=i == 0)
    for i, (name, title, icon) in enumerate(PAGES)
]
st.navigation(pages).run()
