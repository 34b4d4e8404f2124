"""Fine-tuning GPT-2 on torch.distributed's FSDP2 (one process or many under torchrun): `finetune(TrainConfig(...))`.
Imports fastgpt2.model and fastgpt2.kernels only (never the serving engine)."""
from fastgpt2.train.config import TrainConfig
from fastgpt2.train.prepare import prepare_data
from fastgpt2.train.run import finetune

__all__ = ["TrainConfig", "finetune", "prepare_data"]
