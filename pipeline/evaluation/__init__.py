"""Evaluation of evolved losses and meta-learned Atari agents."""
