"""RedPajama-1T -> one phiforge dataset with datatrove's SlurmPipelineExecutor (docs/data.md, "RedPajama-1T on K
machines"): 64 prepare tasks as a Slurm array, then one merge job that waits for them.

    python examples/slurm/prepare_redpajama_datatrove.py --input /data/RedPajama-Data-1T \
        --parts /data/phiforge/redpajama-parts --out /data/phiforge/redpajama --partition cpu

datatrove writes a completion file per task under --logs and skips completed tasks when this script is run
again; phiforge's own part directories do the same (a complete part is not prepared again, an interrupted one
resumes from its journal), so rerunning after failures redoes only what failed. Needs `pip install
"phiforge[data]"` (datatrove). Locally, LocalPipelineExecutor(pipeline=[step], tasks=N, workers=K) runs the
same step (the tests do); RayPipelineExecutor runs it on a Ray cluster.
"""

import argparse

from datatrove.executor import SlurmPipelineExecutor

from phiforge.data.merge import MergeParts
from phiforge.data.tasks import PrepareTasks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--parts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--partition", required=True)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--cpus-per-task", type=int, default=32)  # 2 tasks per 64-core machine
    ap.add_argument("--logs", default="logs/prepare-redpajama")
    ap.add_argument("--venv", default=".venv")
    args = ap.parse_args()
    step = PrepareTasks(["redpajama", "--input", args.input, "--out", args.parts,
                         "--workers", str(args.cpus_per_task - 1), "--checkpoint-seconds", "300"])
    slurm = {"time": "12:00:00", "partition": args.partition, "venv_path": f"{args.venv}/bin/activate"}
    prepare = SlurmPipelineExecutor(pipeline=[step], tasks=args.tasks, workers=16, cpus_per_task=args.cpus_per_task,
                                    mem_per_cpu_gb=2, job_name="prepare-rp", logging_dir=args.logs, **slurm)
    SlurmPipelineExecutor(pipeline=[MergeParts([args.parts], args.out)], tasks=1, cpus_per_task=4, job_name="merge-rp",
                          logging_dir=f"{args.logs}-merge", depends=prepare, **slurm).run()

if __name__ == "__main__":
    main()
