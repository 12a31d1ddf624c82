"""Built-in detection plugin."""
