"""The Nemotron-H model: `NemotronHForCausalLM`, its layers and the `HybridCache` it runs over."""
from .cache import HybridCache
from .model import NemotronHForCausalLM, init_weights

__all__ = ["HybridCache", "NemotronHForCausalLM", "init_weights"]
