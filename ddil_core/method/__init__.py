"""Layer 3: rollouts, the DDIL state mixture, the replay buffer, and the base objectives."""
