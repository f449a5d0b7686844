"""Experiment tooling around the agent: sweeps (process pool or Ray), results, plots, claims."""
