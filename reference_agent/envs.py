"""Creating and checking gymnasium environments for the reference DQN."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

EXTRA_FOR_ENV = {"LunarLander": "box2d", "BipedalWalker": "box2d", "CarRacing": "box2d"}


class EnvError(ValueError):
    """An environment that cannot be made or that the DQN cannot handle."""


def make_env(env_id: str) -> gym.Env:
    """``gym.make(env_id)``, checked: discrete actions, a flat Box observation. Errors name the
    extra to install when a dependency (e.g. Box2D for LunarLander) is missing. Without gymnasium's
    passive environment checker: it only warns about a misbehaving environment on its first reset
    and step, and its wrapper costs every step (about a tenth of a Box2D step, measured)."""
    try:
        env = gym.make(env_id, disable_env_checker=True)
    except gym.error.DependencyNotInstalled as err:
        extra = next((x for k, x in EXTRA_FOR_ENV.items() if env_id.startswith(k)), None)
        hint = f"pip install 'plasticity-probe[{extra}]'" if extra else str(err)
        raise EnvError(f"{env_id} needs a missing dependency: {hint}") from None
    except gym.error.Error as err:
        raise EnvError(f"cannot make environment {env_id!r}: {err}") from None
    if not isinstance(env.action_space, gym.spaces.Discrete):
        env.close()
        raise EnvError(f"{env_id} has a {type(env.action_space).__name__} action space; DQN needs Discrete")
    space = env.observation_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        env.close()
        raise EnvError(f"{env_id} has observation space {space}; the reference DQN needs a flat Box")
    return env


def episode_seed(seed: int, stream: int, index: int) -> int:
    """A 31-bit reset seed for episode ``index`` of ``stream`` (0: training, 1: evaluation).
    Seeding every reset makes an episode replayable from its seed and actions (used by resume)."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0] >> 1)
