"""The simulated world: characters, users and their gold utility, chat env, traffic."""
