"""The generated control scripts: writing them, and the entry point they call."""
