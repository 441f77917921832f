"""The web UI (Gradio): generate with head-level PAG, pick heads on a grid, run HeadHunter, compare results."""

from .host import ModelHost


def build_app(*args, **kwargs):
    """See [`headpag.app.ui.build_app`] (imports Gradio on first use)."""
    from .ui import build_app as _build_app

    return _build_app(*args, **kwargs)


def launch(*args, **kwargs):
    """See [`headpag.app.ui.launch`] (imports Gradio on first use)."""
    from .ui import launch as _launch

    return _launch(*args, **kwargs)


__all__ = ["ModelHost", "build_app", "launch"]
