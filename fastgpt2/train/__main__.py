"""Worker entry point of a launch started by finetune(): `python -m fastgpt2.train <config.json>`."""
import sys

from fastgpt2.train.config import TrainConfig
from fastgpt2.train.run import run_rank

if len(sys.argv) != 2:
    sys.exit("usage: python -m fastgpt2.train CONFIG.json")
run_rank(TrainConfig.load(sys.argv[1]))
