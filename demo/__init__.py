"""The Gradio explorer over `vit_core`: `python demo/app.py` from a clone, `vit-explorer` installed."""
