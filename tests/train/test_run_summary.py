"""The end of a run: a short summary instead of a raw dict; TensorBoard forgets the steps a resume redoes."""
import os

from emu_mc.metrics import RunLogger, run_summary


def test_summary_names_what_a_user_looks_for(tmp_path):
    text = run_summary(first_step=3, last_step=10, tokens=12345, images=67, wall_s=150, out_dir=str(tmp_path),
                       metrics={"loss": 4.5, "ce": 4.0, "reg": 0.5, "tokens_per_s": 100.0, "mfu": None},
                       data_stats={"kind": "webdataset", "samples_used": 19, "per_source": {"image_text": 19},
                                   "decode_paths": {"image:pil": 18}, "skipped": {"bad_image": 2},
                                   "bad_shards": {}},
                       checkpoint=str(tmp_path / "checkpoints" / "step_000010"), tensorboard=True)
    for part in ("steps 4..10 (7 this run)", "2.5 min", "12,345 tokens", "67 images", "loss 4.5000", "ce 4.0000",
                 "reg 0.5000", "19 samples used (image_text 19)", "image:pil 18", "skipped samples: bad_image 2",
                 "step_000010", "metrics.jsonl", "tensorboard --logdir"):
        assert part in text, (part, text)
    assert "{" not in text


def test_resumed_logger_purges_redone_tensorboard_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for first, last in ((1, 6), (4, 8)):  # the second run resumes from a checkpoint at step 3
        logger = RunLogger(str(tmp_path), resume_step=first - 1)
        for step in range(first, last + 1):
            logger.log(step, {"loss": float(step + (100 if first > 1 else 0))})
        logger.close()
    events = EventAccumulator(os.path.join(tmp_path, "tensorboard"))
    events.Reload()
    steps = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in steps] == list(range(1, 9))
    assert dict(steps)[5] == 105.0  # the redone step, not the first run's
