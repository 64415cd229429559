"""fedrad.server."""
