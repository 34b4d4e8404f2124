"""Triton kernels, their pure-torch references, the Python side of the C++ extension (native.py, cpu_sampling.py)
and the one dispatcher that picks among them per operation and device. Imports nothing from model/ or engine/."""
