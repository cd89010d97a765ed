"""Meta-RL pipeline: Evolved Policy Gradients and meta-gradient RL."""
