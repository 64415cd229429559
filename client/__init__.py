"""fedrad.client."""
