"""`phiforge plan --config FILE --gpus N --gpu-mem GiB`: predicted per-GPU memory and the largest micro-batch."""

from __future__ import annotations

import json

from phiforge.commands import add_config_args, load_command_config
from phiforge.config import check_range


def register(sub) -> None:
    p = sub.add_parser("plan", help="predict per-GPU training memory and the largest micro-batch that fits")
    add_config_args(p, "phiforge.train.config.TrainConfig, as for `phiforge train`", "micro_batch_size=8")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (world size)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (H100 80GB: 79.1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="hsdp: shard within groups of this size")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.add_argument("--measure", action="store_true",
                   help="also run 3 steps on this machine's CPU (the config's layout, --gpus processes, fp32 "
                        "unless precision is set) and compare the measured peak with the CPU prediction")
    p.set_defaults(func=run)


def run(args) -> int:
    from phiforge.train.config import TrainConfig
    from phiforge.train.plan import cpu_plan, format_plan, max_micro_batch, measure_cpu_peak, plan_memory

    check_range("--gpus", args.gpus, 1)
    check_range("--gpus-per-node", args.gpus_per_node, 1)
    check_range("--gpu-mem", args.gpu_mem, 0.0, lo_open=True, note=" (GiB per GPU)")
    cfg = load_command_config(TrainConfig, args)
    if cfg is None:
        return 0
    if args.json:
        plan = plan_memory(cfg, args.gpus, args.gpus_per_node).to_dict()
        plan["max_micro_batch_size"] = max_micro_batch(cfg, args.gpus, args.gpu_mem, args.gpus_per_node)
        plan["gpu_mem_gib"] = args.gpu_mem
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(cfg, args.gpus, args.gpu_mem, args.gpus_per_node))
    if args.measure:
        predicted = cpu_plan(cfg, args.gpus).peak_bytes
        peaks = measure_cpu_peak(cfg, args.gpus)
        worst = max(peaks)
        mib = 2**20
        print(f"CPU check ({args.gpus} process(es), precision {cfg.precision}): predicted {predicted / mib:.1f} MiB, "
              f"measured peak live tensors {worst / mib:.1f} MiB (busiest rank; all: "
              f"{', '.join(f'{p / mib:.1f}' for p in peaks)}): {predicted / worst - 1:+.1%}")
    return 0
