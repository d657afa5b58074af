"""scheduler: dynamic resource scheduling (Q-learning agent, simulator, online plugin)."""
