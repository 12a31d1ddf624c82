"""Built-in segmentation plugin."""
