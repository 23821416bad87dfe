"""nemotron3: a pure-PyTorch implementation of NVIDIA's Nemotron 3 hybrid Mamba-2 / attention / LatentMoE
language models with Multi-Token Prediction, reading and writing Hugging Face `nemotron_h` checkpoints.

    import nemotron3
    model = nemotron3.load("models/pico")          # or any nemotron_h directory
    logits = model(token_ids)                      # [B, T] -> [B, T, vocab]
"""
from .checkpoint import CheckpointError, load, save
from .config import ConfigError, NemotronConfig
from .model import HybridCache, NemotronHForCausalLM

__version__ = "0.1.0"
__all__ = ["load", "save", "NemotronConfig", "NemotronHForCausalLM", "HybridCache", "CheckpointError", "ConfigError"]
