"""GRPO over thinking structures: the pure math against hand-computed values, masks from real engine
episodes, micro-batching that does not change the update, a toy task that a few GRPO steps learn, and
checkpoint resume (CPU, the ``tiny_model_dir`` model); one GRPO step of the shipped trained model on the
engine's own reward, with its valid episodes' rewards worked out by hand."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from shared.backends.scripted import ScriptedBackend
from shared.engine import Engine, EngineConfig, EpisodeResult
from shared.episode import EpisodeSettings
from shared.messages import SegmentRecord
from shared.protocol import join_result
from shared.tasks import get_task
from trainer.grpo import checkpoint as ckpt
from trainer.grpo.config import GRPOConfigArgs
from trainer.grpo.loop import train_grpo
from trainer.grpo.losses import (
    Sequence,
    collate,
    episode_sequences,
    group_advantages,
    policy_loss,
    token_logprobs,
)
from trainer.grpo.rollout import refresh_weights
from trainer.grpo.update import grpo_update, micro_batches


# ------------------------------------------------------------------------------------------ advantages
def test_group_advantages_by_hand() -> None:
    # one group [1, 0, 0, 1]: mean 0.5, population std 0.5
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), scale="none", eps=1e-4)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), scale="std", eps=1e-4)
    assert adv.tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001])
    # two groups [P=2, G=3]: [1, 2, 3] has std sqrt(2/3); [5, 5, 5] carries no signal
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]), eps=1e-4)
    s = math.sqrt(2 / 3) + 1e-4
    assert adv.shape == (2, 3)
    assert adv[0].tolist() == pytest.approx([-1 / s, 0.0, 1 / s])
    assert adv[1].tolist() == [0.0, 0.0, 0.0]


def test_group_advantages_all_equal_is_exactly_zero() -> None:
    for value in (0.0, -1.0, 0.3):
        adv = group_advantages(torch.full((8,), value))
        assert torch.equal(adv, torch.zeros(8))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), scale="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.zeros(2, 2, 2))


# -------------------------------------------------------------------------------------- sequences/masks
def _seg(agent: str, prompt: list[int], ids: list[int], mask: list[int], **kw: Any) -> SegmentRecord:
    return SegmentRecord(
        agent=agent,
        role="worker" if agent != "organizer" else "organizer",
        prompt_ids=prompt,
        completion_ids=ids,
        completion_mask=mask,
        **kw,
    )


def test_episode_sequences_keeps_masks_and_skips_segments_without_ids() -> None:
    result = SimpleNamespace(
        segments=[
            _seg("organizer", [1, 2], [3, 4, 5, 6], [1, 1, 0, 1]),
            _seg("1", [7], [8, 9], [1, 1]),
            _seg("2", [], [], [], error="timeout"),  # a timed-out worker: no ids
            _seg("3", [7], [10], [0]),  # nothing generated
        ]
    )
    seqs = episode_sequences(result)
    assert [s.agent for s in seqs] == ["organizer", "1"]
    assert seqs[0] == Sequence([1, 2], [3, 4, 5, 6], [1, 1, 0, 1], "organizer")
    assert [s.n_generated for s in seqs] == [3, 2]
    bad = SimpleNamespace(segments=[_seg("organizer", [1], [2, 3], [1])])
    with pytest.raises(ValueError, match="completion_mask"):
        episode_sequences(bad)


def test_collate_by_hand() -> None:
    a = Sequence([5, 6], [7, 8, 9], [1, 0, 1])
    b = Sequence([4], [3], [1])
    batch = collate([a, b], [2.0, -1.0], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # targets are input_ids[:, 1:] = [6, 7, 8, 9] and [3, 0, 0, 0]: only generated completion ids count
    assert batch.loss_mask.tolist() == [[0, 1, 0, 1], [1, 0, 0, 0]]
    assert batch.advantages.tolist() == [[2.0] * 4, [-1.0] * 4]
    assert batch.n_tokens == 3
    with pytest.raises(ValueError, match="advantages"):
        collate([a, b], [1.0], pad_id=0)


def _scripted_episode() -> EpisodeResult:
    """A real engine episode with a fork, a join (injected text) and an answer, one char per token."""
    task = get_task("countdown")
    problem = task.problem_from_payload({"numbers": [3, 7, 25, 50], "target": 75, "n_solutions": 1})
    script = {"organizer": "ab<FORK-1>q</FORK-1><JOIN-1>ok<ANSWER>50+25</ANSWER>", "1": "w<RETURN>7</RETURN>"}
    engine = Engine(ScriptedBackend(script), task, EngineConfig())
    return asyncio.run(engine.run(problem, episode_id="ep"))


def test_one_advantage_for_organizer_and_worker_tokens_and_none_for_injected() -> None:
    result = _scripted_episode()
    assert result.status == "completed", result.format_errors
    seqs = episode_sequences(result)
    assert [s.agent for s in seqs] == ["organizer", "1"]
    injected = join_result(1, "7")
    org = seqs[0]
    assert org.completion_mask.count(0) == len(injected)  # only the join's text is masked
    batch = collate(seqs, [0.75] * len(seqs), pad_id=0)  # the episode's advantage, for each sequence
    generated = batch.loss_mask.bool()
    assert torch.all(batch.advantages[generated] == 0.75)
    assert int(generated.sum()) == sum(s.n_generated for s in seqs)
    # the injected ids sit at the organizer's masked positions and get zero loss weight and gradient
    n_p = len(org.prompt_ids)
    text_ids = batch.input_ids[0, 1:].tolist()
    masked = [t for t, m in zip(text_ids, batch.loss_mask[0].tolist(), strict=True) if m == 0][n_p - 1 :]
    assert "".join(chr(i) for i in masked[: len(injected)]) == injected
    logp = torch.zeros_like(batch.loss_mask, requires_grad=True)
    policy_loss(logp, logp.detach(), batch.advantages, batch.loss_mask).loss.backward()
    assert logp.grad is not None
    assert torch.all(logp.grad[~generated] == 0)
    assert torch.all(logp.grad[generated] == -0.75 / int(generated.sum()))


# --------------------------------------------------------------------------------------- log-probs/loss
def test_token_logprobs_by_hand() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), 0.0], [5.0, 5.0]]])  # [1, 3, 2]
    ids = torch.tensor([[0, 1, 0]])
    # p(x1=1 | pos 0) = 3/4; p(x2=0 | pos 1) = 2/3
    assert token_logprobs(logits, ids).tolist()[0] == pytest.approx([math.log(0.75), math.log(2 / 3)])
    # temperature 2: logits halved -> p(x1=1) = sqrt3 / (1 + sqrt3)
    assert token_logprobs(logits, ids, temperature=2.0)[0, 0].item() == pytest.approx(
        math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    )


def test_policy_loss_by_hand() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    logp = torch.zeros(2, 3, requires_grad=True)
    out = policy_loss(logp, logp.detach(), adv, mask)  # ratio 1: -(2 + 2 - 1) / 3 generated tokens
    assert out.loss.item() == pytest.approx(-1.0)
    out.loss.backward()
    assert logp.grad is not None
    assert logp.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, 0.0, 1 / 3, 0.0, 0.0])
    # sequences: mean per sequence (-2, +1), then over the two sequences
    assert policy_loss(logp, logp.detach(), adv, mask, norm="sequences").loss.item() == pytest.approx(-0.5)
    # an explicit denominator (micro-batching: the whole step's token count)
    assert policy_loss(logp, logp.detach(), adv, mask, denominator=6.0).loss.item() == pytest.approx(-0.5)


def test_policy_loss_clips_and_penalizes_kl() -> None:
    one = torch.ones(1, 1)
    old = torch.zeros(1, 1)
    up = torch.full((1, 1), math.log(1.5))  # ratio 1.5
    pos = policy_loss(up, old, torch.tensor([1.0]), one, clip_eps=0.2)
    assert pos.loss.item() == pytest.approx(-1.2)  # min(1.5, 1.2) * A
    assert pos.clip_frac == 1.0
    neg = policy_loss(up, old, torch.tensor([-1.0]), one, clip_eps=0.2)
    assert neg.loss.item() == pytest.approx(1.5)  # min(-1.5, -1.2): the unclipped, pessimistic side
    assert neg.clip_frac == 0.0
    ref = torch.full((1, 1), math.log(2.0))  # ref - logp = ln 2: k3 = 2 - ln 2 - 1
    kl = policy_loss(old, old, torch.tensor([0.0]), one, kl_beta=0.5, ref_logp=ref)
    assert kl.kl == pytest.approx(1 - math.log(2))
    assert kl.loss.item() == pytest.approx(0.5 * (1 - math.log(2)))
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(old, old, torch.tensor([0.0]), one, kl_beta=0.1)


def test_all_equal_group_gives_zero_loss_and_gradient() -> None:
    adv = group_advantages(torch.tensor([[0.4, 0.4, 0.4, 0.4]]))[0]  # [G]
    batch = collate([Sequence([1], [2, 3], [1, 1])] * 4, adv, pad_id=0)
    logp = torch.randn(batch.loss_mask.shape, requires_grad=True)
    out = policy_loss(logp, logp.detach(), batch.advantages, batch.loss_mask)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert logp.grad is not None and torch.all(logp.grad == 0)


# ----------------------------------------------------------------------------------------- the update
def _config(tiny_model_dir: Path, out: Path, **kw: Any) -> GRPOConfigArgs:
    """A CPU config; episode settings (mode, budgets, temperature ...) may be given among ``kw``."""
    base: dict[str, Any] = dict(
        model=tiny_model_dir, out=out, device="cpu", progress=False, max_grad_norm=0.0
    )
    episode = {k: kw.pop(k) for k in list(kw) if k in EpisodeSettings.model_fields and k != "seed"}
    base.update(kw)
    return GRPOConfigArgs(**base, episode=EpisodeSettings(**({"temperature": 1.0} | episode)))


def test_micro_batching_does_not_change_the_update(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    seqs = [
        Sequence(
            torch.randint(3, 500, (n_p,), generator=g).tolist(),
            torch.randint(3, 500, (n_c,), generator=g).tolist(),
            [1] * (n_c - 2) + [0, 1],
        )
        for n_p, n_c in [(5, 9), (3, 4), (7, 12), (2, 6)]
    ]
    advs = [1.0, -0.5, 0.25, 0.0]
    assert len(list(micro_batches(list(zip(seqs, advs, strict=True)), 20))) > 1
    params = []
    for budget in (10_000, 20):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        stats = grpo_update(
            model,
            opt,
            seqs,
            advs,
            _config(tiny_model_dir, tmp_path, micro_batch_tokens=budget),
            pad_id=0,
            device=torch.device("cpu"),
            bf16=False,
        )
        assert stats.trained_sequences == 3  # the zero-advantage sequence is not run
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-6)


def test_micro_batches_respect_the_budget() -> None:
    items = [(Sequence([1] * n, [2], [1]), 0.0) for n in (1, 9, 3, 4, 20)]
    chunks = list(micro_batches(items, 12))
    assert sorted(len(s) for c in chunks for s, _ in c) == [2, 4, 5, 10, 21]
    for c in chunks:
        assert len(c) == 1 or len(c) * max(len(s) for s, _ in c) <= 12


def test_refresh_weights_into_the_transformers_backend(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from shared.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    refresh_weights(backend, model, "grpo-7")
    assert backend.weight_version == "grpo-7"
    for a, b in zip(backend.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    asyncio.run(backend.aclose())


# ----------------------------------------------------------------------------------------- the loop
TOY_PROBLEMS = [{"numbers": [3, 7, 25, 50], "target": 75}, {"numbers": [2, 4, 8, 9], "target": 36}]


def _toy(tiny_model_dir: Path, tmp_path: Path, **kw: Any) -> tuple[GRPOConfigArgs, Any]:
    """Reward: the fraction of generated tokens that contain a digit (learnable from the organizer alone)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    digits = {i for i in range(len(tok)) if any(c.isdigit() for c in tok.decode([i]))}
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in TOY_PROBLEMS))

    def reward_fn(result: EpisodeResult) -> float:
        ids = [
            i for s in result.segments for i, m in zip(s.completion_ids, s.completion_mask, strict=True) if m
        ]
        return sum(i in digits for i in ids) / max(len(ids), 1)

    settings: dict[str, Any] = dict(
        problems_file=problems,
        problems_per_step=2,
        group_size=8,
        organizer_budget=12,
        worker_budget=8,
        lr=1e-2,
        seed=0,
        save_every=5,
    )
    settings.update(kw)
    return _config(tiny_model_dir, tmp_path / "out", **settings), reward_fn


def test_a_few_grpo_steps_raise_the_reward_on_a_toy_task(tiny_model_dir: Path, tmp_path: Path) -> None:
    config, reward_fn = _toy(tiny_model_dir, tmp_path, steps=15)
    run = train_grpo(config, reward_fn=reward_fn)
    assert run.step == 15 and run.stopped == "done"
    rewards = [r["reward"] for r in run.metrics]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards
    rec = run.metrics[0]
    for key in (
        "reward_accuracy",
        "reward_concurrency",
        "format_error_rate",
        "reward_total",
        "accuracy",
        "latency_T",
        "eta_over_c",
        "forks_per_episode",
        "rollout_tokens_per_s",
        "update_s",
    ):
        assert key in rec
    assert rec["episodes"] == 16 and rec["rollout_tokens_per_s"] > 0
    final = tmp_path / "out" / "final"
    assert {"config.json", "grpo_config.json", "metrics.jsonl", ckpt.STATE_FILE} <= {
        p.name for p in final.iterdir()
    }
    assert any(final.glob("*.safetensors")) and (final / "tokenizer.json").is_file()
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 15
    assert (tmp_path / "out" / "checkpoint-10").is_dir()


def test_resume_restores_the_step_count(tiny_model_dir: Path, tmp_path: Path) -> None:
    config, reward_fn = _toy(tiny_model_dir, tmp_path, steps=3, save_every=2)
    train_grpo(config, reward_fn=reward_fn)
    out = tmp_path / "out"
    shutil.rmtree(out / "final")  # as if the run had been cut off after step 2's checkpoint
    assert ckpt.find_latest(out) == out / "checkpoint-2"
    resumed = train_grpo(
        _toy(tiny_model_dir, tmp_path, steps=4, save_every=2, resume=True)[0], reward_fn=reward_fn
    )
    assert [r["step"] for r in resumed.metrics] == [3, 4]
    assert resumed.step == 4 and resumed.last_checkpoint == out / "final"
    assert ckpt.read_step(out / "final") == 4
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]


def test_max_minutes_stops_cleanly_with_a_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    config, reward_fn = _toy(tiny_model_dir, tmp_path, steps=50, max_minutes=0.001)
    run = train_grpo(config, reward_fn=reward_fn)
    assert run.stopped == "time" and run.step == 1
    assert run.last_checkpoint == tmp_path / "out" / "checkpoint-1"
    assert ckpt.read_step(run.last_checkpoint) == 1


# ---------------------------------------------------------------------------------------- the config
def test_config_validation_names_the_fix(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        _config(tiny_model_dir, tmp_path, group_size=1)
    with pytest.raises(ValueError, match="mode"):
        _config(tiny_model_dir, tmp_path, mode="parallel")
    with pytest.raises(ValueError, match="not a model directory"):
        _config(tmp_path, tmp_path)
    with pytest.raises(ValueError, match="format_error_reward"):
        _config(tiny_model_dir, tmp_path, format_error_reward=0.5)
    with pytest.raises(ValueError, match="temperature"):
        _config(tiny_model_dir, tmp_path, temperature=0.0)
    with pytest.raises(ValueError, match="rollout_attention must be one of"):
        _config(tiny_model_dir, tmp_path, rollout_attention="flash")


def test_config_options_round_trip(tiny_model_dir: Path, tmp_path: Path) -> None:
    import argparse

    from cli.options import add_options, collect

    parser = argparse.ArgumentParser()
    add_options(parser, GRPOConfigArgs)
    ns = parser.parse_args(
        [
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path),
            "--steps",
            "7",
            "--problems-per-step",
            "3",
            "--group-size",
            "4",
            "--mode",
            "sequential",
            "--lam",
            "0",
            "--no-progress",
            "--bf16",
            "--capacity",
            "3",
        ]
    )
    cfg = GRPOConfigArgs(**collect(ns, GRPOConfigArgs))
    assert (cfg.steps, cfg.problems_per_step, cfg.group_size, cfg.episode.mode) == (7, 3, 4, "sequential")
    assert cfg.lam == 0.0 and cfg.progress is False and cfg.bf16 is True and cfg.episode.capacity == 3
    assert cfg.model == tiny_model_dir and cfg.resume is False
    assert cfg.episode.temperature == 1.0  # GRPO's default, not serving's greedy 0
    with pytest.raises(SystemExit):  # parallel is not a training mode: refused by the option's choices
        parser.parse_args(["--model", str(tiny_model_dir), "--out", str(tmp_path), "--mode", "parallel"])
    # a config saved before the episode settings were nested still loads
    from trainer.grpo.config import load

    old = cfg.to_json()
    old.update(old.pop("episode"))
    old.pop("seed", None)
    (tmp_path / "old.json").write_text(json.dumps(old | {"seed": 5}))
    again = load(tmp_path / "old.json")
    assert again.episode == cfg.episode and again.seed == 5


def test_refresh_weights_into_the_slot_engine(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.grpo.rollout import open_rollout_backend

    model: Any = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    config = _config(tiny_model_dir, tmp_path, rollout_backend="slot", rollout_slots=4, rollout_max_len=64)
    backend: Any = open_rollout_backend(config, model, tok, tiny_model_dir, torch.device("cpu"), bf16=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    refresh_weights(backend, model, "grpo-3")
    assert backend.weight_version == "grpo-3"
    assert torch.equal(backend.engine.weights.embed, model.get_input_embeddings().weight)
    asyncio.run(backend.aclose())


def test_the_grpo_verb(tiny_model_dir: Path, tmp_path: Path) -> None:
    from cli import main

    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in TOY_PROBLEMS))
    out = tmp_path / "run"
    code = main(
        [
            "grpo",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--problems-file",
            str(problems),
            "--steps",
            "1",
            "--problems-per-step",
            "2",
            "--group-size",
            "2",
            "--organizer-budget",
            "8",
            "--worker-budget",
            "4",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    assert ckpt.read_step(out / "final") == 1
    assert main(["grpo", "--model", str(tiny_model_dir), "--out", str(out), "--group-size", "1"]) == 2


def test_the_trainer_trains_on_the_engines_own_reward(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reward function given: the rewards GRPO averages and normalizes are the engine's, computed with
    the run's reward config. The rollouts are recorded on their way from the real ``run_group_rollouts``
    to the loop (passed through unchanged) and rescored here with ``shared.rewards.total_reward``.

    The tiny model's weights are random: every episode runs out of its 8-token budget without an answer,
    a format error, so R = R_FE for all of them (the engine tests compare valid episodes' R_A + λ·R_η
    with hand-worked values). An R_FE of -0.7 instead of the default -1.0 shows the run's config reached
    the engine; equal rewards in every group give zero advantages, so the update trains nothing."""
    from shared.rewards import RewardConfig, total_reward
    from trainer.grpo import loop

    seen: list[list[list[EpisodeResult]]] = []
    real = loop.run_group_rollouts

    async def recorded(*args: Any, **kw: Any) -> list[list[EpisodeResult]]:
        groups = await real(*args, **kw)
        seen.append(groups)
        return groups

    monkeypatch.setattr(loop, "run_group_rollouts", recorded)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in TOY_PROBLEMS))
    config = _config(
        tiny_model_dir, tmp_path / "out", problems_file=problems, problems_per_step=2, group_size=2,
        organizer_budget=8, worker_budget=4, steps=1, save_every=0, seed=0,
        format_error_reward=-0.7, lam=0.3, tau=0.5,
    )  # fmt: skip
    run = train_grpo(config)
    (groups,) = seen
    (rec,) = run.metrics
    cfg = RewardConfig(format_error_reward=-0.7, concurrency_weight=0.3, tau=0.5)
    totals = []
    for group in groups:
        assert len(group) == 2
        for r in group:
            expected = total_reward(
                accuracy=r.score.accuracy if r.score is not None else 0.0,
                eta=r.eta, capacity=r.capacity, format_error=bool(r.format_errors), config=cfg,
            )  # fmt: skip
            assert r.rewards == expected
            totals.append(expected.total)
    assert len(totals) == 4 and rec["episodes"] == 4
    assert totals == [-0.7] * 4  # every episode is a format error (see the docstring)
    assert rec["reward"] == pytest.approx(sum(totals) / 4) == pytest.approx(-0.7)
    assert rec["reward_total"] == pytest.approx(-0.7) and rec["format_error_rate"] == 1.0
    assert rec["reward_std_in_group"] == 0.0 and rec["zero_advantage_groups"] == 1.0
    assert rec["trained_sequences"] == 0


# The shipped trained model (read only: the run writes under tmp_path) on two easy problems. Seed 3 of
# the loop draws the problems in this order and samples the episodes whose arithmetic is worked out below.
SHIPPED_MODEL = Path(__file__).resolve().parents[3] / "models" / "asyncthink-countdown-small"
SHIPPED_PROBLEMS = [
    {"numbers": [3, 7, 25, 50], "target": 75, "n_solutions": 4},
    {"numbers": [2, 5, 10, 20], "target": 50, "n_solutions": 4},
]


def _advantage_weighted_logprob(model_dir: Path, seqs: list[Sequence], advs: list[float]) -> float:
    """``Σ A · log p(token)`` over the generated tokens of ``seqs`` under the model in ``model_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    batch = collate(seqs, advs, pad_id=0)
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, L, V]
        logp = token_logprobs(logits, batch.input_ids)  # [B, L-1]
    return float((logp * batch.advantages * batch.loss_mask).sum())


@pytest.mark.slow  # 9 s on 2 CPU cores, 25-30 s when they are busy: four episodes of ~250 tokens, one update
def test_a_grpo_step_of_the_shipped_model_on_the_engines_own_reward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped trained model's episodes, sampled at temperature 1 by the real rollout path and
    scored by the engine (no reward function given), are valid and invalid both: R = R_FE for the two
    format errors, R = R_A + λ·R_η for the two valid episodes, worked out by hand from their recorded
    timelines (T and the tokens of each agent). Each group holds one of each, so every advantage is
    nonzero, every sequence is trained, the saved weights differ from the start and the update raises
    the advantage-weighted log-likelihood of the sampled tokens.

    R_FE = -0.6, λ = 0.3 and τ = 0.9 (not the defaults; τ above every η/c here, so R_η = η/c / τ is not
    capped). The episodes are those of seed 3: each agent samples with its own seeded generator, fp32 on
    the CPU. The rollouts and the update's inputs are recorded on their way (passed through unchanged)."""
    from safetensors.torch import load_file

    from shared.messages import EpisodeStatus
    from shared.rewards import RewardConfig, total_reward
    from trainer.grpo import loop

    seen: list[list[list[EpisodeResult]]] = []
    updates: list[tuple[list[Sequence], list[float]]] = []
    real_rollouts, real_update = loop.run_group_rollouts, loop.grpo_update

    async def recorded(*args: Any, **kw: Any) -> list[list[EpisodeResult]]:
        groups = await real_rollouts(*args, **kw)
        seen.append(groups)
        return groups

    def recorded_update(
        model: Any, opt: Any, seqs: list[Sequence], advs: list[float], *a: Any, **kw: Any
    ) -> Any:
        updates.append((list(seqs), list(advs)))
        return real_update(model, opt, seqs, advs, *a, **kw)

    monkeypatch.setattr(loop, "run_group_rollouts", recorded)
    monkeypatch.setattr(loop, "grpo_update", recorded_update)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in SHIPPED_PROBLEMS))
    config = _config(
        SHIPPED_MODEL, tmp_path / "out", problems_file=problems, problems_per_step=2, group_size=2,
        organizer_budget=288, worker_budget=128, steps=1, save_every=0, seed=3, lr=1e-4,
        format_error_reward=-0.6, lam=0.3, tau=0.9,
    )  # fmt: skip
    run = train_grpo(config)
    (groups,) = seen
    (rec,) = run.metrics
    cfg = RewardConfig(format_error_reward=-0.6, concurrency_weight=0.3, tau=0.9)

    # every reward is total_reward of the episode's own accuracy, η, capacity and format error
    assert [[r.problem.payload for r in g] for g in groups] == [[p] * 2 for p in SHIPPED_PROBLEMS]
    flat = [r for g in groups for r in g]
    for r in flat:
        assert r.capacity == 2  # countdown's default c
        expected = total_reward(
            accuracy=r.score.accuracy if r.score is not None else 0.0,
            eta=r.eta, capacity=r.capacity, format_error=bool(r.format_errors), config=cfg,
        )  # fmt: skip
        assert r.rewards == expected
    assert [r.status for r in flat] == [
        EpisodeStatus.FORMAT_ERROR, EpisodeStatus.COMPLETED, EpisodeStatus.COMPLETED, EpisodeStatus.FORMAT_ERROR
    ]  # fmt: skip
    fe_1, valid_1, valid_2, fe_2 = flat
    # worker 2 ran out of its 128 tokens: a format error, R_FE although the organizer wrote an answer
    assert [e["kind"] for e in fe_1.format_errors] == ["budget_exceeded", "unclosed_tag", "missing_answer"]
    assert fe_1.answer is not None and fe_1.rewards.total == -0.6
    # the organizer ran out of its 288 tokens without an answer
    assert [e["kind"] for e in fe_2.format_errors] == ["budget_exceeded", "missing_answer"]
    assert fe_2.latency == 288 and fe_2.rewards.total == -0.6

    # valid_1: the organizer decodes 34 tokens, forks worker 1 (54 tokens, done at 34 + 54 = 88), decodes
    # 50 (to 84), joins 1 (waits to 88), decodes 26 (to 114), forks worker 2 (61 tokens, done at 175),
    # decodes 94 (to 208), joins 2 (208 > 175, no wait) and decodes 37: T = 208 + 37 = 245.
    # η = (241 + 54 + 61) / 245 = 356/245; η/c = 178/245 < τ: R_η = (178/245) / 0.9 = 356/441.
    # Of the first n_s = 4 expressions of its answer only 25*3 solves the problem (a bare 75 does not
    # count): R_A = 1/4; R = 1/4 + 0.3 · 356/441.
    assert valid_1.timeline.to_json() == [
        ["decode", 34], ["fork", 1, [["decode", 54]]], ["decode", 50], ["join", 1], ["decode", 26],
        ["fork", 2, [["decode", 61]]], ["decode", 94], ["join", 2], ["decode", 37],
    ]  # fmt: skip
    tokens = [(s.agent, s.generated_tokens) for s in valid_1.segments]
    assert tokens == [("organizer", 241), ("1", 54), ("2", 61)]
    assert valid_1.latency == 245 and valid_1.eta == pytest.approx(356 / 245)
    assert valid_1.answer == "75; 25*3; 7+5; (7-3)*50/25; 7+25"
    assert valid_1.score is not None and (valid_1.score.correct, valid_1.score.needed) == (1, 4)
    assert valid_1.rewards.accuracy == 0.25 and valid_1.rewards.concurrency == pytest.approx(356 / 441)
    r_valid_1 = 0.25 + 0.3 * 356 / 441  # 0.49218 ...
    assert valid_1.rewards.total == pytest.approx(r_valid_1)
    # valid_2: 34 tokens, fork 1 (41 tokens, done at 75), 83 more (to 117 > 75), join 1, 114 more:
    # T = 34 + 83 + 114 = 231; η = (231 + 41) / 231 = 272/231; R_η = (136/231) / 0.9 = 1360/2079.
    # No solution among its answers: R_A = 0; R = 0.3 · 1360/2079 = 408/2079.
    assert valid_2.timeline.to_json() == [
        ["decode", 34], ["fork", 1, [["decode", 41]]], ["decode", 83], ["join", 1], ["decode", 114]
    ]  # fmt: skip
    assert [(s.agent, s.generated_tokens) for s in valid_2.segments] == [("organizer", 231), ("1", 41)]
    assert valid_2.latency == 231 and valid_2.eta == pytest.approx(272 / 231)
    assert valid_2.score is not None and valid_2.score.correct == 0
    r_valid_2 = 408 / 2079  # 0.19625 ...
    assert valid_2.rewards.total == pytest.approx(r_valid_2)

    # the logged step: means over the four rewards; each group's population std is half its spread
    totals = [r.rewards.total for r in flat]
    assert rec["episodes"] == 4 and rec["format_error_rate"] == 0.5
    assert rec["reward"] == pytest.approx(sum(totals) / 4) == pytest.approx((r_valid_1 + r_valid_2 - 1.2) / 4)
    assert rec["reward_total"] == pytest.approx(rec["reward"])
    assert rec["reward_accuracy"] == pytest.approx(0.25 / 4)
    stds = [(r_valid_1 + 0.6) / 2, (r_valid_2 + 0.6) / 2]
    assert rec["reward_std_in_group"] == pytest.approx(sum(stds) / 2)
    assert rec["zero_advantage_groups"] == 0.0

    # the update: each episode's sequences carry (R - mean) / (std + eps) = ±std / (std + eps) of its group
    ((seqs, advs),) = updates
    per_episode = [-stds[0], stds[0], stds[1], -stds[1]]
    expected_advs = [a / (abs(a) + 1e-4) for a in per_episode]
    n_seqs = [len(episode_sequences(r)) for r in flat]
    assert n_seqs == [3, 3, 2, 3]  # organizer and workers (fe_1's worker 2 too: it has tokens)
    assert advs == pytest.approx([a for a, n in zip(expected_advs, n_seqs, strict=True) for _ in range(n)])
    assert all(a != 0 for a in advs)
    assert rec["trained_sequences"] == 11 and rec["trained_tokens"] == rec["rollout_tokens"] > 0
    assert rec["update_skipped"] is False

    # the saved weights moved, in the direction the advantages ask for
    final = run.last_checkpoint
    assert final == tmp_path / "out" / "final"
    start = load_file(str(SHIPPED_MODEL / "model.safetensors"))
    after = load_file(str(final / "model.safetensors"))
    assert start.keys() == after.keys()
    changed = [k for k in start if not torch.equal(start[k].float(), after[k].float())]
    assert len(changed) == len(start)
    before = _advantage_weighted_logprob(SHIPPED_MODEL, seqs, advs)
    assert _advantage_weighted_logprob(final, seqs, advs) > before
