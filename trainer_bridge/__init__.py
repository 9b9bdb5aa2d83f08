"""The compact GPU LoRA trainer: `train(TrainConfig)` -> kohya-format LoRA safetensors."""

from trainer_bridge.config import TrainConfig, TrainError
from trainer_bridge.train import TrainResult, train

__all__ = ["TrainConfig", "TrainError", "TrainResult", "train", "lora_info"]


def lora_info(path: str) -> dict:
    """Summary of a LoRA file's metadata (rank, alpha, base model, lrs, tag frequency)."""
    from trainer_bridge.export import lora_info as _info

    return _info(path)
