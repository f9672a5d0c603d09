"""Generation shared by chat, eval, RL rollouts and serve."""
