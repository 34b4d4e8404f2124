"""Triton kernels and their pure-torch references; `dispatch` picks one per device. Imports nothing from engine/."""
