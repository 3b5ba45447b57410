"""The drivers: each owns the order of its run's steps (PPO, reward-model training)."""
