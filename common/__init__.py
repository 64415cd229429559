"""fedrad.common."""
