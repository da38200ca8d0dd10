"""Training through faults: an MDPO run paused after step 3 and continued from its checkpoint, then
a Ray Train worker SIGKILLed mid-run and the worker group restarted from the latest checkpoint
(``max_failures``). In this lane (`make test-faults`), not `make test`: one run pays for the pause,
the kill and the redone steps (~4 min here). MDPO itself runs in `make test` inside the loop test
(tests/loop/test_loop_run.py: ZeRO-3, a partitioned frozen reference, step 1 exactly DPO)."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from pipelines.construction import Recipe, build_stages
from pipelines.core.rows import OK
from pipelines.core.rundir import RunDir
from pipelines.core.stage import run_stages
from pipelines.training.mdpo import TokenizePairs, pair_tensors, sequence_logps
from pipelines.training.train_loop import TrainingPaused
from tests.training.test_training import mdpo_recipe, metrics, preference_pairs

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def reward_accuracy(policy_dir: str, reference_dir: str, recipe: Recipe, pairs: list[dict]) -> float:
    """Share of held-out pairs whose implicit reward ranks chosen over rejected."""
    import pyarrow as pa
    from transformers import AutoModelForCausalLM

    tokenize = TokenizePairs(recipe.stages.mdpo)
    table = tokenize(pa.Table.from_pylist(pairs)).to_pydict()
    batch = {k: table[k] for k in ("chosen_ids", "rejected_ids", "prompt_len")}
    tensors = pair_tensors(batch, torch.device("cpu"))
    with torch.no_grad():
        pol = sequence_logps(AutoModelForCausalLM.from_pretrained(policy_dir).eval(), tensors)
        ref = sequence_logps(AutoModelForCausalLM.from_pretrained(reference_dir).eval(), tensors)
    n = len(pairs)
    h = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
    return float((h > 0).double().mean())

def assert_mdpo_learns(recipe: Recipe, manifests: dict, base_model: str) -> list[dict]:
    """A finished 8-step MDPO run (128 pairs, K = 12 of 16): step 1 is DPO, every step keeps K,
    the running mean follows its recursion, and the policy ranks chosen over rejected, on its last
    training batch and on held-out pairs. Returns the metrics history."""
    assert manifests["mdpo"]["rows"]["out"] == 128
    history = metrics(Path(recipe.run_dir), "mdpo")
    assert [h["step"] for h in history] == list(range(1, 9))
    first = history[0]
    assert first["beta_m"] == pytest.approx(0.1) and first["running_mean"] == 0.0   # step 1 is DPO
    assert all(h["kept"] == 12 for h in history)
    for before, after in itertools.pairwise(history):   # R̄ ← γ R̄ + (1 − γ) m_B between steps
        assert after["running_mean"] == pytest.approx(0.9 * before["running_mean"] + 0.1 * before["batch_mean"])
    assert history[-1]["reward_accuracy"] > 0.9
    held_out = preference_pairs(48, seed=1)
    assert reward_accuracy(str(Path(recipe.run_dir) / "mdpo" / "model"), base_model, recipe, held_out) > 0.9
    return history

def _kill_a_train_worker_at(work: Path, step: int, killed: list[int], timeout: float = 600) -> None:
    """Once rank 0 has logged ``step``, SIGKILL one Ray Train worker process of this session (a
    descendant of the test process: the local Ray's raylet started it)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline and not killed:
        logged = [json.loads(line)["step"] for path in work.glob("*/logs/metrics.jsonl")
                  for line in path.read_text().splitlines() if line.strip()]
        if step in logged:
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                        proc.kill()
                        killed.append(proc.pid)
                        return
        time.sleep(0.05)
def test_mdpo_resumes_from_checkpoint(tmp_path, tiny_models, ray_local):
    """ZeRO-2 with a precomputed reference, paused after step 3 and run again: it continues from
    the checkpoint (step, running mean, schedule, RNG states). In that second run a training worker
    is killed after step 5: with ``max_failures: 1`` Ray Train restarts the workers from the latest
    checkpoint (step 4's), and the steps it redoes train on the same rows with the same loss and
    running mean as the first time. The finished run learns. (The reference as a frozen model partitioned under
    ZeRO-3: the loop test, tests/loop/test_loop_run.py, whose first MDPO step must be exactly DPO.)"""
    model = tiny_models["causal-lm"]
    pairs = preference_pairs(128, seed=0)
    recipe = mdpo_recipe(tmp_path, model, pairs,
                         deepspeed="zero2", reference="precomputed", stop_after_steps=3,
                         warmup_ratio=0.25)
    with pytest.raises(TrainingPaused, match="step 3 of 8"):
        run_stages(build_stages(recipe), RunDir(recipe.run_dir))
    rundir = RunDir(recipe.run_dir)
    assert rundir.read_manifest("mdpo") is None            # not complete
    work = Path(recipe.run_dir, "_work", "mdpo")
    logs = next(work.glob("*/logs/metrics.jsonl"))
    first_run = [json.loads(x) for x in logs.read_text().splitlines()]
    assert [h["step"] for h in first_run] == [1, 2, 3]
    assert sorted(p.name for p in work.rglob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]
    # the rest of the run: the same recipe without the stop, a checkpoint every 4 steps, one restart
    # allowed, and a worker killed once step 5 is done
    recipe.stages.mdpo.stop_after_steps = None
    recipe.stages.mdpo.checkpoint_every_steps = 4
    recipe.stages.mdpo.max_failures = 1
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_train_worker_at, args=(work, 5, killed), daemon=True)
    killer.start()
    manifests = run_stages(build_stages(recipe), rundir)
    killer.join(5)
    assert killed, "no training worker was killed"
    # continued at 4, not 1 (steps 1..8 once each in the logs), and learned
    history = assert_mdpo_learns(recipe, manifests, model)
    assert manifests["mdpo"]["summary"]["final_metrics"]["step"] == 8
    # the running mean came back from the checkpoint
    third = history[2]
    assert history[3]["running_mean"] == pytest.approx(0.9 * third["running_mean"] + 0.1 * third["batch_mean"])
    # so did the schedule: step k runs at the rate of schedule step k − 1 (2 warmup steps, then cosine)
    schedule = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]
    lr = recipe.stages.mdpo.learning_rate
    assert [h["lr"] for h in history] == pytest.approx([lr * f for f in schedule])
    # each row trained on exactly once, by step: 8 steps × 16 pairs = all 128 (one epoch, no tail)
    log_dir = Path(recipe.run_dir, "mdpo", "logs")
    trained = [json.loads(x) for x in (log_dir / "trained_rows.jsonl").read_text().splitlines()]
    assert [t["step"] for t in trained] == list(range(1, 9))
    ids = [i for t in trained for rank in t["ids"] for i in rank]
    assert len(ids) == len(set(ids)) == 128 and set(ids) == set(rundir.column_values("mdpo", OK, "id"))
    # what the killed attempt did after the step-4 checkpoint was redone exactly: same rows, loss, R̄
    redone = [json.loads(x) for x in (log_dir / "redone.jsonl").read_text().splitlines()]
    redone_steps = sorted(r["step"] for r in redone if r["file"] == "metrics.jsonl")
    # from the latest checkpoint Ray Train had registered when the worker died: step 4's, or step 3's
    # when its report was still on the way to the controller
    assert redone_steps[0] in (4, 5) and redone_steps == list(range(redone_steps[0], redone_steps[-1] + 1))
    assert 5 in redone_steps
    by_step = {h["step"]: h for h in history}
    rows_by_step = {t["step"]: t["ids"] for t in trained}
    for before in redone:
        if before["file"] == "trained_rows.jsonl":
            assert before["ids"] == rows_by_step[before["step"]]
        else:
            again = by_step[before["step"]]
            for key in ("loss", "running_mean", "batch_mean", "beta_m", "lr"):
                assert again[key] == pytest.approx(before[key], rel=1e-6, abs=1e-9), (before["step"], key)
    assert not work.exists()  # scratch removed once complete
