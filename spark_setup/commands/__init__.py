"""CLI commands, one module each, each with `register(app)`. Commands print; the modules they call return data."""
