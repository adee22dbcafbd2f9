"""SFT Studio web UI (Gradio). Never imports torch at module level and never trains: it writes YAML and
launches the backend as a subprocess."""
