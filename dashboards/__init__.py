"""Streamlit dashboards, read-only over a run store."""
