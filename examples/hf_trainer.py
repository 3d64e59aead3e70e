"""Hugging Face: FlatnessTrainer and a CurvatureCallback on a small BERT classifier.

FlatnessTrainer is a ``transformers.Trainer`` whose loss adds λ·Tr(H²)/B; the model is a small
BertForSequenceClassification built from a config (no download), trained on the Trainer's dict
batches (``model(**batch).loss``).

The task is synthetic: does token 7 occur in the sequence? Needs ``pip install 'flatness[hf]'``
(and ``flatness[tensorboard]`` for event files). About 20 s on a CPU.

    python examples/hf_trainer.py --out runs/hf_trainer
"""

import argparse
import os
from pathlib import Path

import torch
import transformers

from flatness.integrations.hf import CurvatureCallback, FlatnessTrainer
from flatness.measures import MeasureOptions


def dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 32, (n, 12), generator=g)
    labels = (ids == 7).any(1).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hf_trainer"))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(args.out / "tb"))
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
        attn_implementation="sdpa",  # fine: the curvature pass selects the math SDPA kernel
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    report_to = []
    try:
        import tensorboard  # noqa: F401

        report_to = ["tensorboard"]
    except ImportError:
        pass
    training_args = transformers.TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=16, learning_rate=1e-3,
        logging_steps=10, save_strategy="no", report_to=report_to, disable_tqdm=True, use_cpu=True, seed=0,
    )
    trainer = FlatnessTrainer(
        model=model, args=training_args, train_dataset=dataset(512, 0), eval_dataset=dataset(256, 1),
        lam=0.01, probes=2, every=5, seed=0,  # the penalty's keywords
        callbacks=[CurvatureCallback(every=15, measures=["lambda_max", "trace"],
                                     options=MeasureOptions(matvecs=10, k=1, eigen_tol=1e-2))],
    )
    trainer.train()
    result = trainer.evaluate()
    curvature = [h for h in trainer.state.log_history if "curvature/lambda_max" in h]
    for h in curvature:
        print(f"step {h['step']:3d}: λ_max {h['curvature/lambda_max']:.4f}, Tr(H) {h['curvature/hessian_trace']:.3f} "
              f"({h['curvature/seconds']:.2f} s)")
    print(f"eval loss {result['eval_loss']:.4f}; last Tr(H²) estimate {trainer.penalty.last_sq_trace:.4f}")


if __name__ == "__main__":
    main()
