"""Run by tests/test_precision.py, in 1 process or under torchrun: build the model the way the trainers do (meta ->
parallelize -> materialise) with `precision` and `strategy`, run one training forward and backward under a
TorchDispatchMode that records the dtypes of each op class (phiforge.train.checks.OpRecorder, which the GPU check
uses too), and write the records as JSON to OUT (rank 0).

    python tests/precision_worker.py OUT STRATEGY PRECISION
"""

import json
import sys

import torch

from phiforge.config import load_config
from phiforge.train.build import build_text_model
from phiforge.train.checks import OpRecorder
from phiforge.train.config import TrainConfig
from phiforge.train.distributed import barrier, init_distributed, shutdown
from phiforge.train.parallelize import grad_sync, resolve_layout

T = 16  # data.seq_len


out, strategy, precision = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config(TrainConfig, None, ["model.preset=tiny", "model.n_layer=2",
                                      "model.moe={num_experts: 4, top_k: 2, every: 2}", f"data.seq_len={T}",
                                      "device=cpu", f"precision={precision}", f"parallel.strategy={strategy}"])
env = init_distributed("cpu")
layout = resolve_layout(cfg, env)
model, train_model = build_text_model(cfg, cfg.model_config(), env, layout)
x = torch.randint(0, 4096, (2, T + 1), generator=torch.Generator().manual_seed(env.rank))
recorder = OpRecorder(model.cfg.rotary_dim, model.cfg.moe.num_experts, T)
with grad_sync(train_model, layout, True), recorder:
    train_model(x[:, :-1], x[:, 1:]).loss.backward()
if env.is_main:
    with open(out, "w") as f:
        json.dump({"strategy": layout.strategy, "precision": layout.precision.name,
                   "fully_shard": layout.fully_sharded, "records": recorder.records}, f)
barrier(env)
shutdown(env)
