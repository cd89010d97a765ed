"""Evolved Policy Gradients (Houthooft et al. 2018)."""
