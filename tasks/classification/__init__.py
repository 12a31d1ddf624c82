"""Built-in classification plugin."""
