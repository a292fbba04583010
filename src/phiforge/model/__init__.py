from phiforge.model.moe import MoE, MoEConfig
from phiforge.model.phi2 import PRESETS, KVCache, Phi2, Phi2Config, count_params_meta

__all__ = ["PRESETS", "KVCache", "MoE", "MoEConfig", "Phi2", "Phi2Config", "count_params_meta"]
