"""fedrad.simulations."""
