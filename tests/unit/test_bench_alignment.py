"""bench/alignment_quality.py's bookkeeping: the labeler's rule, disjoint subjects, the paired held-out gain
and its standard error, and the met / not-met rows of the targets."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from types import SimpleNamespace

from bench import alignment_child, alignment_quality

EOS = 2


def test_the_labeler_prefers_ended_then_shorter_answers_and_ties_are_no_preference() -> None:
    ended_long, ended_short, unended_short = [5] * 9 + [EOS], [5, 6, EOS], [5, 6]
    assert alignment_child.concise_preference(unended_short, ended_long, EOS) == (ended_long, unended_short)
    assert alignment_child.concise_preference(ended_long, ended_short, EOS) == (ended_short, ended_long)
    assert alignment_child.concise_preference([5, 6, 7], [8, 9, 10], EOS) is None  # both unended, same length
    assert alignment_child.concise_preference([5, EOS], [7, EOS], EOS) is None


def test_training_judge_and_held_out_subjects_are_disjoint() -> None:
    sets = [
        set(alignment_quality._TRAIN_TOPICS),
        set(alignment_quality._JUDGE_TOPICS),
        set(alignment_quality._HELDOUT_TOPICS),
    ]
    assert all(len(s) >= 12 for s in sets)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def _evaluation() -> dict[str, object]:
    # 3 prompts x 2 samples; the policy's per-prompt judge means beat the base's by 1, 2 and 3.
    base = {"judge": [0.0, 0.0, 1.0, 1.0, 2.0, 2.0], "proxy": [0.0] * 6, "kl": [0.0] * 6,
            "ended": [False] * 6, "tokens": [48] * 6}  # fmt: skip
    policy = {"judge": [1.0, 1.0, 3.0, 3.0, 4.0, 6.0], "proxy": [1.0] * 6, "kl": [1.0, 2.0, 3.0, 1.0, 2.0, 3.0],
              "ended": [True, True, True, False, False, False], "tokens": [10] * 6}  # fmt: skip
    trl = {**policy, "judge": [0.5] * 2 + [1.5] * 2 + [2.5] * 2, "kl": [4.0] * 6, "ended": [False] * 6}
    return {"samples_per_prompt": 2, "results": {"base": base, "alignd": policy, "trl": trl}}


def test_the_gain_is_paired_by_prompt_and_the_targets_say_met_or_not() -> None:
    run = SimpleNamespace(result={"step_marks": [0.0, 5.0, 11.0], "hwm_gib": 2.0})
    rows = alignment_quality.policy_rows(_evaluation(), {"alignd": run})
    by = {r["policy"]: r for r in rows}
    diffs = [1.0, 2.0, 3.0]  # per-prompt means minus the base's
    assert by["alignd"]["judge_gain"] == 2.0
    assert math.isclose(by["alignd"]["judge_gain_se"], round(statistics.stdev(diffs) / math.sqrt(3), 3))
    assert by["alignd"]["eos_rate"] == 0.5 and by["alignd"]["kl_per_answer"] == 2.0
    assert by["alignd"]["updates"] == 2 and by["alignd"]["peak_rss_gib"] == 2.0
    assert by["trl"]["judge_gain"] == 0.5 and by["base"]["judge_gain"] == 0.0
    targets = {t["target"]: t["met"] for t in alignment_quality.targets_of(rows)}
    assert targets == {
        "alignd: held-out judge gain >= TRL's (same run)": True,
        "alignd: KL per answer <= half TRL's": True,  # 2.0 <= 0.5 * 4.0
        "alignd: held-out EOS rate >= 0.5": True,
    }
    rows[1]["kl_per_answer"] = 2.01
    assert not {t["target"]: t["met"] for t in alignment_quality.targets_of(rows)}[
        "alignd: KL per answer <= half TRL's"
    ]


def test_every_alignd_variant_is_a_valid_job_of_its_method_with_the_shared_settings(tmp_path: Path) -> None:
    from contract.hyperparameters import GRPOHyperparameters, PPOHyperparameters

    args = SimpleNamespace(
        model="tiny", seed=0, threads=1, seconds=10.0, max_updates=3, max_new_tokens=48, reward_max_steps=None,
        eval_samples=2,
    )  # fmt: skip
    cfg = alignment_quality.build_config(args, tmp_path)
    models = {"ppo": PPOHyperparameters, "grpo": GRPOHyperparameters}
    for name, variant in alignment_quality.VARIANTS.items():
        hp = models[variant.get("method", "ppo")].model_validate(alignment_child._alignd_hp(cfg, variant))
        assert hp.learning_rate == cfg["learning_rate"] and hp.temperature == cfg["temperature"], name
        assert hp.max_new_tokens == cfg["max_new_tokens"], name
    grpo = GRPOHyperparameters.model_validate(
        alignment_child._alignd_hp(cfg, alignment_quality.VARIANTS["alignd_grpo"])
    )
    # the same episodes per update as PPO's batch of 8 prompts, one answer each
    assert grpo.batch_size * grpo.num_generations == cfg["batch_size"]
    assert grpo.beta > 0
