"""The simulated world: characters, users and their gold utility, chat env, traffic.

Importing ``sim`` registers the gymnasium environment ``flywheel/SocialChat-v0``
(``sim.env.ChatEnv``; ``gymnasium.make_vec`` builds ``sim.env.VectorChatEnv``).
"""

from gymnasium.envs.registration import register, registry

ENV_ID = "flywheel/SocialChat-v0"

if ENV_ID not in registry:
    register(
        id=ENV_ID,
        entry_point="sim.env:ChatEnv",
        vector_entry_point="sim.env:VectorChatEnv",
        disable_env_checker=False,
    )
