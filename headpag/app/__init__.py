"""Gradio web UI (planned: issue 7). Nothing is implemented here yet."""
