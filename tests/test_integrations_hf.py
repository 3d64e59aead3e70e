"""Hugging Face, for real: FlatnessTrainer on a tiny BertForSequenceClassification built from a
config (no download), with dict batches; CurvatureCallback into the Trainer's logs and TensorBoard.
"""

import glob

import pytest
import torch

transformers = pytest.importorskip("transformers")  # a guard for installs without the extra; CI has it

from flatness import FlatnessPenalty  # noqa: E402
from flatness.batch_loss import ModelLoss, hf_loss  # noqa: E402
from flatness.integrations.hf import CurvatureCallback, FlatnessTrainer  # noqa: E402
from flatness.measures import MeasureOptions  # noqa: E402

N, T = 8, 6
CHEAP = MeasureOptions(matvecs=4, k=1, eigen_tol=1e-2)  # the callbacks' plumbing, not accuracy
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _bert(attn: str = "sdpa") -> "transformers.PreTrainedModel":
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (N, T), generator=g)
    labels = torch.randint(0, 2, (N,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": labels[i]}
            for i in range(N)]


def _args(tmp_path, steps: int, **kw) -> "transformers.TrainingArguments":
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=N, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_flatness_trainer_step_is_loss_plus_penalty_on_dict_batches(tmp_path, attn):
    model = _bert(attn)
    trainer = FlatnessTrainer(model=model, args=_args(tmp_path, 1), train_dataset=_dataset(),
                              lam=0.5, probes=2, every=1, seed=3)
    trainer.train()
    assert trainer.penalty is not None and trainer.penalty.last_sq_trace > 0
    logged = [h for h in trainer.state.log_history if "flatness_penalty" in h]
    assert logged and logged[0]["flatness_penalty"] == pytest.approx(trainer.penalty.last_penalty)

    # the same step by hand: the model's loss + the penalty of model(**batch).loss, one SGD step
    ref = _bert(attn)
    ref.train()
    batch = transformers.default_data_collator(_dataset())
    penalty = FlatnessPenalty(ref, ModelLoss(hf_loss), lam=0.5, probes=2, seed=3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    (ref(**batch).loss + penalty(batch)).backward()
    opt.step()
    assert penalty.last_sq_trace == pytest.approx(trainer.penalty.last_sq_trace, rel=1e-4)
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_without_lam_it_is_the_plain_trainer_and_evaluation_adds_nothing(tmp_path):
    plain = _bert()
    transformers.Trainer(model=plain, args=_args(tmp_path, 2), train_dataset=_dataset()).train()
    model = _bert()
    trainer = FlatnessTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_dataset(), lam=0.0)
    trainer.train()
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    trainer = FlatnessTrainer(model=model, args=_args(tmp_path, 2), eval_dataset=_dataset(), lam=1.0, seed=0)
    trainer.evaluate()
    assert trainer.penalty is None  # evaluation runs without gradients: no curvature pass


def test_unknown_keywords_are_one_clear_error(tmp_path):
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['prob'\]"):
        FlatnessTrainer(model=_bert(), args=_args(tmp_path, 1), train_dataset=_dataset(), prob=3)
    with pytest.raises(ValueError, match="probes"):
        FlatnessTrainer(model=_bert(), args=_args(tmp_path, 1), train_dataset=_dataset(), probes=0)


def test_curvature_callback_reports_through_the_trainer_to_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5's way
    callback = CurvatureCallback(every=2, measures=["lambda_max", "trace"], options=CHEAP)
    args = _args(tmp_path, 4, report_to=["tensorboard"])
    trainer = FlatnessTrainer(model=_bert(), args=args, train_dataset=_dataset(), lam=0.1, probes=1,
                              every=2, seed=0, callbacks=[callback])
    trainer.train()
    records = [h for h in trainer.state.log_history if "curvature/lambda_max" in h]
    assert [h["step"] for h in records] == [2, 4]
    assert all(h["curvature/lambda_max"] > 0 and h["curvature/hvps"] > 0 for h in records)
    (events_dir,) = {p.rsplit("/", 1)[0] for p in glob.glob(str(tmp_path / "tb" / "**" / "events.*"), recursive=True)}
    events = EventAccumulator(events_dir)
    events.Reload()
    # transformers' TensorBoard callback files training logs under "train/"
    assert [e.step for e in events.Scalars("train/curvature/lambda_max")] == [2, 4]
    assert "train/curvature/hessian_trace" in events.Tags()["scalars"]


def test_curvature_callback_on_a_plain_trainer_goes_to_the_log_history(tmp_path):
    callback = CurvatureCallback(every=1, measures=["lambda_max"], path=tmp_path / "c.csv", options=CHEAP)
    trainer = transformers.Trainer(model=_bert(), args=_args(tmp_path, 2), train_dataset=_dataset(),
                                   callbacks=[callback])
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "curvature/lambda_max" in h] == [1, 2]
    assert [line.split(",")[0] for line in (tmp_path / "c.csv").read_text().splitlines()] == ["step", "1", "2"]
