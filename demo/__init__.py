"""Gradio UI: tabs, streaming of decoded blocks to the browser, per-session controls."""
