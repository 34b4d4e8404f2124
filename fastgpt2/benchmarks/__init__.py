"""The benchmark suite behind `fastgpt2 bench` and bench/*.py: fastgpt2 side by side with Hugging Face transformers.

common.py holds the reporting shared by every suite (machine info, medians, copy bandwidth, tables, result files);
cpu.py is the CPU suite's entry point and report, cpu_cases.py its cases.
"""
