"""`phiforge study --config studies/NAME.yaml`: one architecture, one data set, one token budget, several routes,
several seeds.

A study trains the same Phi-2-family model on the same tokens with the same hyperparameters through each route:

    phiforge   `phiforge train` (dense, or with `model.moe` set; any `train` key can differ per route, e.g.
               optim.name for another optimizer)
    litgpt     `litgpt pretrain`, through `phiforge litgpt pretrain`

and repeats every route for each of `seeds`. Seed S sets train.seed (the initial weights) and train.data.seed
(the order of the training windows) of every route, so the routes of one seed start from the same weights and
read the same windows in the same order, and differences between routes can be judged seed by seed (stats.py).

Steps (all under work_dir, default runs/studies/NAME):
  1. data: `phiforge prepare CORPUS ...` (or an existing phiforge dataset), once.
  2. per seed: the initial weights (same_init: true) and, when a LitGPT route runs, its litdata chunks
     (`phiforge litgpt prepare`: phiforge's windows in phiforge's order for that seed). One dense model per
     dense architecture is drawn with torch.manual_seed(S); a route of that architecture starts from it (LitGPT
     through `convert to-litgpt`), an MoE route gets it upcycled with zero-output experts (`convert upcycle
     --init zero`: after_mlp and parallel compute the dense model's function at step 0; replace_mlp keeps the
     attention and embeddings, its experts replace the MLP).
  3. each (route, seed) runs as its own process, seed after seed; wall time and peak RSS (the process and its
     children, from wait4) are measured from outside, the same way for every route. Then evaluate_route
     (evaluate.py) scores its final checkpoint. A finished run is recorded in study-state.json and skipped
     when the study runs again (unless --rerun, or its config changed): a long study survives an interruption.
  4. report_dir (default docs/results/NAME): report.md, PNG plots, results.json (every per-seed number and the
     aggregates), readme-section.md, each run's metrics.jsonl and the study config (report.py).

Throughput is "steady" tokens/s: tokens over training-loop seconds between consecutive train log events, leaving
out the first interval (warm-up, LitGPT's torch.compile) and any interval that contains a validation. Both
trainers log on the same steps, so the same intervals count for each.

The modules, each importing only those above it:

    config.py    StudyConfig (the study YAML's keys), load_study, and each route's train keys per seed
    stats.py     mean and spread over seeds, and which differences from the reference are real
    evaluate.py  prepare_eval / evaluate_route: what every finished run is scored on (`phiforge eval`'s library)
    results.py   the numbers of the report: per run, per route over seeds, the comparisons and the checks
    plots.py     the report's PNG plots
    report.py    report.md, results.json, readme-section.md and the README's results block
    runner.py    run_study: data, initial weights, each (route, seed) in its own process, then the report
"""
