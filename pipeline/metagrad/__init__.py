"""Meta-gradient RL (Xu, van Hasselt & Silver 2018) on Atari."""
