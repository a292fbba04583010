"""What the test suite and the GPU check (bench/gpu_check.sh) both measure, in one place: the dtype each op class
runs in (OpRecorder), the SDPA kernel chosen, and how often torch.compile compiles over a schedule of
validation and training steps (val_train_schedule).

    recorder = OpRecorder(rotary_dim, num_experts, seq_len)
    with recorder:
        model(x, y).loss.backward()
    recorder.records          # [op class, input dtypes, output dtype] in call order
    recorder.attention_ops    # e.g. {"_scaled_dot_product_flash_attention"} on an H100 in bf16

    losses, vals, counts = val_train_schedule(cfg, env, steps=3)
    compiled_again(counts)    # {} after warm-up: no recompile, no new graph, no graph break
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The SDPA kernels (aten ops) by backend. The public scaled_dot_product_attention picks one of them before
# dispatch, so a dispatch mode sees which one ran.
SDPA_KERNELS = {
    "flash": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"),
    "cudnn": ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"),
    "efficient": ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"),
    "cpu-flash": ("_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_flash_attention_for_cpu_backward"),
    "math": ("_scaled_dot_product_attention_math",),
}
OP_CLASS = {"mm": "matmul", "addmm": "matmul", "bmm": "matmul", "baddbmm": "matmul",
            "native_layer_norm": "layer_norm", "native_layer_norm_backward": "layer_norm", "logsumexp": "loss",
            **{op: "attention" for ops in SDPA_KERNELS.values() for op in ops}}


def sdpa_backend(op_name: str) -> str | None:
    """The backend (a key of SDPA_KERNELS) of an aten op name, None if it is not an SDPA kernel."""
    return next((backend for backend, ops in SDPA_KERNELS.items() if op_name in ops), None)


class OpRecorder(TorchDispatchMode):
    """(op class, input dtypes, output dtype) of every op of a class in OP_CLASS, in call order, and the names of
    the SDPA kernels that ran. RoPE is the multiplication by a [seq_len, rotary_dim] table; the router is the
    matmul that produces [tokens, num_experts] scores."""

    def __init__(self, rotary_dim: int, num_experts: int, seq_len: int):
        super().__init__()
        self.records, self.attention_ops = [], set()
        self.rope_shape, self.num_experts = (seq_len, rotary_dim), num_experts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        first = out[0] if isinstance(out, (tuple, list)) else out
        cls = OP_CLASS.get(name)
        if name == "mul" and any(tuple(t.shape) == self.rope_shape for t in tensors):
            cls = "rope"
        if cls == "matmul" and isinstance(first, torch.Tensor) and first.shape[-1] == self.num_experts:
            cls = "router"
        if cls == "attention":
            self.attention_ops.add(name)
        if cls:
            self.records.append([cls, [str(t.dtype) for t in tensors], str(first.dtype)])
        return out


def dtypes_by_class(records: list) -> dict[str, list[str]]:
    """{op class: the sorted output dtypes it produced} of OpRecorder.records."""
    seen: dict[str, set] = {}
    for cls, _, out in records:
        seen.setdefault(cls, set()).add(out)
    return {cls: sorted(dtypes) for cls, dtypes in seen.items()}


# ---------------------------------------------------------------------------------------------
# Compiles over validation and training


class CountingTokens:
    """A Job's batches on `device`: rows that count up from a random start (learnable in a few steps), the same
    for every run with the same arguments; `steps` training batches and two validation batches."""

    def __init__(self, vocab: int, batch: int, seq: int, steps: int, device: torch.device | str = "cpu"):
        g = torch.Generator().manual_seed(0)

        def rows():
            return ((torch.randint(0, vocab, (batch, 1), generator=g) + torch.arange(seq + 1)) % vocab).to(device)

        self.batches = [rows() for _ in range(steps)]
        self.val = [(b[:, :-1], b[:, 1:]) for b in (rows() for _ in range(2))]
        self.i = 0

    def next_batch(self):
        b = self.batches[self.i]
        self.i += 1
        return b[:, :-1], b[:, 1:]

    def loss(self, model, batch):
        return model(*batch)


COUNTERS = ("stats", "frames", "graph_break")


def val_train_schedule(cfg, env, impl: str | None = None, steps: int = 3,
                       batch: int = 4) -> tuple[list[float], list[float], dict]:
    """(train losses, val losses, torch._dynamo's counters after warm-up) of the schedule val, train, then
    [val, train] x (steps - 1), through the trainers' build path (meta -> parallelize() -> materialise ->
    build_step). The first validation and the first step are the warm-up (the eval graph, then the train graph);
    after them any compile raises (error_on_recompile) or shows in the counters. impl: every MoE layer's."""
    from torch._dynamo.utils import counters

    from phiforge.train.build import build_step, build_text_model
    from phiforge.train.engine import MoEBalancing
    from phiforge.train.parallelize import resolve_layout
    from phiforge.train.validation import evaluate

    layout = resolve_layout(cfg, env)
    model, train_model = build_text_model(cfg, cfg.model_config(), env, layout)
    if impl is not None:
        for moe in model.moe_layers().values():
            moe.impl = impl
    step = build_step(model, train_model, cfg, cfg.optim, env, layout, hooks=[MoEBalancing(model, env)])
    job = CountingTokens(model.cfg.vocab_size, batch, cfg.data.seq_len, steps, env.device)
    vals = [evaluate(train_model, job.val, env)["val_loss"]]
    losses = [step(1, job, False).loss]
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s in range(2, steps + 1):
            vals.append(evaluate(train_model, job.val, env)["val_loss"])
            losses.append(step(s, job, False).loss)
    return losses, vals, {k: dict(counters[k]) for k in COUNTERS}


def compiled_again(counts: dict) -> dict:
    """What compiled after warm-up in val_train_schedule's counters: {} when nothing did, else e.g.
    {"graph_breaks": 2, "frames": 1, "unique_graphs": 1}."""
    found = {"graph_breaks": sum(counts.get("graph_break", {}).values()),
             "frames": counts.get("frames", {}).get("total", 0),
             "unique_graphs": counts.get("stats", {}).get("unique_graphs", 0)}
    return {k: v for k, v in found.items() if v}
