import sys, time, json
import torch
torch.set_num_threads(1)
from flatness.experiments.running.study_population import StudyGrid, STOP_RULE
from flatness.experiments.running.runner import run_grid
task, factors, fixed, protocol = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
arch = sys.argv[5] if len(sys.argv) > 5 else ""
grid = StudyGrid("pilot", task, factors={k: tuple(v) for k, v in factors.items()}, fixed=fixed, seeds=(0,),
                 protocol={**STOP_RULE, **protocol}, architecture=arch)
specs = [s for s, _ in grid.entries()]
for spec in specs:
    t = time.time()
    res = run_grid([spec], sys.argv[6], data_dir=sys.argv[7], progress=False, log=lambda m: None)
    for d, recs in res.items():
        for r in recs:
            print(r.name, json.dumps({k: spec.config.get(k) for k in ("lr", "batch_size", "weight_decay", "model")}), "epochs", len(r.curves["epoch"]), "steps", r.steps, "train_loss", round(r.final_train_loss, 4), "train_acc", r.final_train_acc,
                  "test_acc", r.final_test_acc, "train_s", round(r.train_seconds), "eval_s", round(r.eval_seconds), "total", round(r.total_seconds), flush=True)
            print("  acc curve", [round(x, 3) for x in r.curves["train_acc"]][::5], flush=True)
