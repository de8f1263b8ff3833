"""Independent NumPy references of each layer's equations (one module per layer family)."""
