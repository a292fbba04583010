"""Run by tests/test_engine_init.py, in 1 process or under torchrun: build a model the way the training engine
does (meta device -> parallelize -> materialise) and write its full state dict to OUT (rank 0).

    python tests/init_weights_worker.py OUT STRATEGY [INIT_FROM]
"""

import sys

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from phiforge.config import load_config
from phiforge.train.build import build_text_model, train_model_config
from phiforge.train.config import TrainConfig
from phiforge.train.distributed import barrier, init_distributed, shutdown
from phiforge.train.parallelize import resolve_layout

out, strategy = sys.argv[1], sys.argv[2]
sets = ["model.preset=tiny", "model.moe={num_experts: 4, top_k: 2, every: 2}", "device=cpu", "seed=7",
        f"parallel.strategy={strategy}"]
if len(sys.argv) > 3:
    sets.append(f"init_from={sys.argv[3]}")
cfg = load_config(TrainConfig, None, sets)
env = init_distributed("cpu")
model, _ = build_text_model(cfg, train_model_config(cfg), env, resolve_layout(cfg, env))
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if env.is_main:
    save_file({k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}, out)
barrier(env)  # rank 1 tearing gloo down while rank 0 still writes has aborted it (SIGABRT) under load
shutdown(env)
