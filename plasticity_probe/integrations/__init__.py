"""Callbacks for third-party trainers. Each framework is imported only by its own submodule:
``plasticity_probe.integrations.sb3`` (Stable-Baselines3) and
``plasticity_probe.integrations.lightning`` (Lightning)."""
