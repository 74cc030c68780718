"""An example mlml plug-in package; mlml finds its parts through the entry points in pyproject.toml."""
