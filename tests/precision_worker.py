"""Run by tests/test_precision.py, in 1 process or under torchrun: build the model the way the trainers do (meta ->
parallelize -> materialise) with `precision` and `strategy`, run one training forward and backward under a
TorchDispatchMode that records the dtypes of each op class, and write the records as JSON to OUT (rank 0).

    python tests/precision_worker.py OUT STRATEGY PRECISION
"""

import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from phiforge.config import load_config
from phiforge.train.build import build_text_model
from phiforge.train.config import TrainConfig
from phiforge.train.distributed import barrier, init_distributed, shutdown
from phiforge.train.parallelize import grad_sync, resolve_layout

CLASSES = {"mm": "matmul", "addmm": "matmul", "bmm": "matmul", "baddbmm": "matmul",
           "native_layer_norm": "layer_norm", "native_layer_norm_backward": "layer_norm",
           "_scaled_dot_product_flash_attention_for_cpu": "attention",
           "_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
           "logsumexp": "loss"}
T = 16  # data.seq_len


class DtypeRecorder(TorchDispatchMode):
    """(op class, input dtypes, output dtype) of every op of a class, in call order. RoPE is the multiplication by
    a [T, rotary_dim] table; the router is the matmul that produces [tokens, num_experts] scores."""

    def __init__(self, rotary_dim: int, num_experts: int):
        super().__init__()
        self.records, self.rope_shape, self.num_experts = [], (T, rotary_dim), num_experts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        first = out[0] if isinstance(out, (tuple, list)) else out
        cls = CLASSES.get(name)
        if name == "mul" and any(tuple(t.shape) == self.rope_shape for t in tensors):
            cls = "rope"
        if cls == "matmul" and isinstance(first, torch.Tensor) and first.shape[-1] == self.num_experts:
            cls = "router"
        if cls:
            self.records.append([cls, [str(t.dtype) for t in tensors], str(first.dtype)])
        return out


out, strategy, precision = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config(TrainConfig, None, ["model.preset=tiny", "model.n_layer=2",
                                      "model.moe={num_experts: 4, top_k: 2, every: 2}", f"data.seq_len={T}",
                                      "device=cpu", f"precision={precision}", f"parallel.strategy={strategy}"])
env = init_distributed("cpu")
layout = resolve_layout(cfg, env)
model, train_model = build_text_model(cfg, cfg.model_config(), env, layout)
x = torch.randint(0, 4096, (2, T + 1), generator=torch.Generator().manual_seed(env.rank))
recorder = DtypeRecorder(model.cfg.rotary_dim, model.cfg.moe.num_experts)
with grad_sync(train_model, layout, True), recorder:
    train_model(x[:, :-1], x[:, 1:]).loss.backward()
if env.is_main:
    with open(out, "w") as f:
        json.dump({"strategy": layout.strategy, "precision": layout.precision.name,
                   "fully_shard": layout.fully_sharded, "records": recorder.records}, f)
barrier(env)
shutdown(env)
