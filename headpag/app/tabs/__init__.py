"""The UI's parts, one module per tab (and the model box), composed by [`headpag.app.ui.build_app`]."""
