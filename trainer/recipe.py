"""The countdown training recipe, resumable from committed checkpoints, every minute in a ledger.

    python -m trainer.recipe --work runs/cd --stages synth,sft,grpo,eval --preset small \\
        --sft-minutes 5 --grpo-minutes 10 --eval-n 400 --device cuda

Run the same command again with larger ``--sft-minutes`` / ``--grpo-minutes`` to continue: the minutes
are *totals per run*, and each run trains only what its ledger entry is short of, starting from its
own last checkpoint. Stages (each reads what earlier ones wrote under ``--work``; each may run in a
separate call, on another machine, after a ``git clone`` of the committed work directory):

* ``synth``: search traces (:mod:`trainer.synth.search_teacher`; ``--trace-format paths`` for the first
  teacher's) for the training problems (``--problems``, never a held-out one): AsyncThink episodes
  (organizer and worker records) and sequential traces of the same problems, from the same search lines,
  with their token-length statistics. Deterministic, so ``data/`` need not be committed.
* ``sft``: one tokenizer trained on both data sets and one random-init model (``--preset``) in ``base/``;
  then format SFT from that base with equal minutes: ``sft-async`` on the organizer and worker records,
  ``sft-seq`` on the sequential records.
* ``grpo``: GRPO with equal minutes: ``grpo-async`` (asyncthink mode, R_η on) from ``sft-async``,
  ``grpo-seq`` (sequential mode) from ``sft-seq``, and the ablations ``grpo-async-nolam`` (λ = 0, no
  R_η) from ``sft-async`` and ``grpo-nosft`` (GRPO straight from ``base``, no format SFT), each with
  ``--ablation-minutes`` (default: the GRPO minutes).
* ``eval``: every model and mode on both held-out splits (``--eval-splits``, default ``test`` and
  ``test2``: the fixed split and the one drawn with another seed): AsyncThink, sequential, parallel
  (k traces of the sequential model), the SFT-only models and both ablations, with the trace diagnosis
  (invalid and bare-number candidates and answers). With ``--sweep-budgets`` also the accuracy–latency
  curve of AsyncThink and sequential as the budget grows. Writes ``eval.json`` and a plot per split.
* ``export``: copies one checkpoint (``--export-from``) with its tokenizer to ``--export-dir``.

Checkpoints. Every model directory directly under ``--work`` (``base``, ``sft-*``, ``grpo-*``) is a
loadable model saved in bf16 with its tokenizer: the 8 M ``small`` preset takes 15.2 MiB, so each fits
the repository's 16 MiB budget (checked after every save). Training runs in fp32 under ``scratch/``
(GRPO's optimizer state lives there too and is not kept: a continued run starts a fresh optimizer from
the bf16 weights, with the KL reference, if any, reset to that start). ``minutes.json`` is the ledger:
per run its training minutes (what the equal-minutes rule compares), steps and every session; per stage
every call's wall minutes, failed ones included. Commit ``--work`` without ``data/`` and ``scratch/``.

A failing stage is logged and the recipe goes on with what it has; an unknown stage is refused before any
stage runs. ``tests/unit/trainer/test_recipe.py`` runs every stage at toy size on the CPU (the ``test``
preset, a handful of problems, seconds per run); ``test_recipe_stages.py`` checks them one at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("recipe")

CHECKPOINT_BUDGET_BYTES = 16 * 2**20  # a committed checkpoint: model weights, config and tokenizer
LEDGER = "minutes.json"
SFT_RUNS = (("sft-async", "async.jsonl", ("organizer", "worker")), ("sft-seq", "seq.jsonl", ("sequential",)))
# (run, starts from, mode, λ (None: the default), which minutes)
GRPO_RUNS = (
    ("grpo-async", "sft-async", "asyncthink", None, "grpo"),
    ("grpo-seq", "sft-seq", "sequential", None, "grpo"),
    ("grpo-async-nolam", "sft-async", "asyncthink", 0.0, "ablation"),
    ("grpo-nosft", "base", "asyncthink", None, "ablation"),
)
EVAL_RUNS = (  # (name, model directory, mode, parallel k)
    ("asyncthink", "grpo-async", "asyncthink", 1),
    ("sequential", "grpo-seq", "sequential", 1),
    ("parallel", "grpo-seq", "parallel", 4),
    ("asyncthink-sft-only", "sft-async", "asyncthink", 1),
    ("sequential-sft-only", "sft-seq", "sequential", 1),
    ("ablation-no-r-eta", "grpo-async-nolam", "asyncthink", 1),
    ("ablation-no-format-sft", "grpo-nosft", "asyncthink", 1),
)
SWEEP_RUNS = (("asyncthink", "grpo-async", "asyncthink"), ("sequential", "grpo-seq", "sequential"))


# ------------------------------------------------------------------------------------------ the ledger
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_ledger(work: Path) -> dict[str, Any]:
    path = work / LEDGER
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("runs", {})
    data.setdefault("stages", {})
    return data


def _write_ledger(work: Path, data: dict[str, Any]) -> None:
    data["total_wall_minutes"] = round(sum(s["wall_minutes"] for s in data["stages"].values()), 3)
    data["total_train_minutes"] = round(sum(r["train_minutes"] for r in data["runs"].values()), 3)
    (work / LEDGER).write_text(json.dumps(data, indent=2) + "\n")


def trained_minutes(work: Path, run: str) -> float:
    """Training minutes a run has had so far, over every session."""
    return float(read_ledger(work)["runs"].get(run, {}).get("train_minutes", 0.0))


def record_run(work: Path, run: str, *, train_minutes: float, steps: int, start: str, **extra: Any) -> None:
    """Add one training session of ``run`` to the ledger."""
    data = read_ledger(work)
    entry = data["runs"].setdefault(run, {"train_minutes": 0.0, "steps": 0, "sessions": []})
    entry["train_minutes"] = round(entry["train_minutes"] + train_minutes, 4)
    entry["steps"] += steps
    entry["sessions"].append({"ended": _now(), "train_minutes": round(train_minutes, 4), "steps": steps,
                              "from": start, **extra})
    _write_ledger(work, data)


def record_stage(work: Path, stage: str, wall_minutes: float, ok: bool) -> None:
    data = read_ledger(work)
    entry = data["stages"].setdefault(stage, {"wall_minutes": 0.0, "calls": []})
    entry["wall_minutes"] = round(entry["wall_minutes"] + wall_minutes, 4)
    entry["calls"].append({"ended": _now(), "wall_minutes": round(wall_minutes, 4), "ok": ok})
    _write_ledger(work, data)


def _timed(work: Path, name: str, fn: Any, *args: Any, **kw: Any) -> Any:
    t0 = time.monotonic()
    log.info("stage %s: start", name)
    ok = False
    try:
        out = fn(*args, **kw)
        ok = True
        return out
    except Exception:
        log.error("stage %s failed:\n%s", name, traceback.format_exc())
        return None
    finally:
        minutes = (time.monotonic() - t0) / 60
        record_stage(work, name, minutes, ok)
        log.info("stage %s: %.2f min", name, minutes)


# ------------------------------------------------------------------------------------------ checkpoints
def is_model(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def save_checkpoint(src: Path, dst: Path) -> Path:
    """The model in ``src`` saved in bf16 with its tokenizer to ``dst`` (replacing it); its size is checked
    against the commit budget."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    size = checkpoint_bytes(dst)
    if size > CHECKPOINT_BUDGET_BYTES:
        log.warning("%s takes %.1f MiB, over the %d MiB a committed checkpoint may take", dst, size / 2**20,
                    CHECKPOINT_BUDGET_BYTES // 2**20)
    return dst


# ------------------------------------------------------------------------------------------ synth
def stage_synth(args: argparse.Namespace) -> None:
    from shared.tasks.countdown import CountdownTask
    from trainer.synth.dataset import length_stats, synthesize, token_counter
    from trainer.synth.records import write_jsonl

    data = Path(args.work) / "data"
    if (data / "async.jsonl").is_file() and (data / "seq.jsonl").is_file():
        log.info("%s holds the traces; synth skipped", data)
        return
    task = CountdownTask()
    problems = task.problems(args.problems, args.train_problems)
    if args.trace_format == "search":
        from trainer.synth.search_teacher import SearchTeacher

        teacher: Any = SearchTeacher(task, capacity=args.capacity)
    else:
        from trainer.synth.teacher import CountdownTeacher

        teacher = CountdownTeacher(task, capacity=args.capacity)
    result = synthesize(teacher, problems, asyncthink=True, sequential=True, seed=args.seed)
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl([r for r in result.records if r.kind != "sequential"], data / "async.jsonl")
    write_jsonl([r for r in result.records if r.kind == "sequential"], data / "seq.jsonl")
    stats = length_stats(result.records, token_counter("train", result.records, vocab_size=args.vocab_size,
                                                       seed=args.seed), args.capacity)
    (data / "stats.json").write_text(json.dumps({"summary": result.summary(), "lengths": stats}, indent=1) + "\n")
    log.info("synth: %s", result.summary())


# ------------------------------------------------------------------------------------------ sft
def stage_sft(args: argparse.Namespace) -> None:
    from trainer.modeling import build_model
    from trainer.sft import SFTConfigArgs, load_records, run_sft
    from trainer.tokenizer import default_corpus, train_tokenizer

    work = Path(args.work)
    data = work / "data"
    base = work / "base"
    if not is_model(base):
        records = load_records([str(data / "async.jsonl"), str(data / "seq.jsonl")],
                               ("organizer", "worker", "sequential"))
        corpus = [r.prompt + r.completion for r in records]
        tokenizer = train_tokenizer([*corpus, *default_corpus(seed=args.seed)], args.vocab_size)
        scratch = work / "scratch" / "base"
        build_model(scratch, tokenizer, preset=args.preset, seed=args.seed, max_position=args.max_position)
        save_checkpoint(scratch, base)
    wanted = {f"sft-{r.strip()}" for r in args.sft_runs.split(",")}
    for name, data_file, kinds in SFT_RUNS:
        if name not in wanted:
            continue
        left = args.sft_minutes - trained_minutes(work, name)
        if left < args.min_minutes:
            log.info("%s: %.2f of %.2f minutes done; skipped", name, trained_minutes(work, name), args.sft_minutes)
            continue
        start = work / name if is_model(work / name) else base
        out = work / "scratch" / name
        if out.exists():
            shutil.rmtree(out)
        cfg = SFTConfigArgs(data=[str(data / data_file)], out=str(out), model=str(start), kinds=kinds,
                            engine="torch", epochs=1000.0, max_steps=args.sft_max_steps, max_minutes=left,
                            lr=args.sft_lr,
                            batch_size=args.sft_batch, max_length=args.max_length, seed=args.seed,
                            progress=False, logging_steps=50, warmup_ratio=0.02, eval_records=16)
        metrics = run_sft(cfg)
        save_checkpoint(out, work / name)
        record_run(work, name, train_minutes=metrics["train_runtime"] / 60, steps=int(metrics["global_step"]),
                   start=start.name, loss_before=round(metrics["loss_before"], 4),
                   loss_after=round(metrics["loss_after"], 4), sequences=metrics["sequences"],
                   dropped_too_long=metrics["dropped_too_long"])
        log.info("%s: %d steps, loss %.3f -> %.3f", name, metrics["global_step"], metrics["loss_before"],
                 metrics["loss_after"])


# ------------------------------------------------------------------------------------------ grpo
def stage_grpo(args: argparse.Namespace) -> None:
    from shared.episode import EpisodeSettings
    from trainer.grpo import train_grpo
    from trainer.grpo.config import GRPOConfigArgs

    work = Path(args.work)
    minutes = {"grpo": args.grpo_minutes, "ablation": args.grpo_minutes if args.ablation_minutes is None
               else args.ablation_minutes}
    for name, parent, mode, lam, which in GRPO_RUNS:
        target = minutes[which]
        left = target - trained_minutes(work, name)
        start = work / name if is_model(work / name) else work / parent
        if left < args.min_minutes or not is_model(start):
            log.info("%s: %.2f of %.2f minutes done, start %s; skipped", name, trained_minutes(work, name),
                     target, start)
            continue
        out = work / "scratch" / name
        if out.exists():
            shutil.rmtree(out)
        episode = EpisodeSettings(mode=mode, capacity=args.capacity, organizer_budget=args.organizer_budget,
                                  worker_budget=args.worker_budget, temperature=1.0)
        cfg = GRPOConfigArgs(
            model=start, out=out, task="countdown", episode=episode, problems_file=Path(args.problems),
            steps=args.grpo_steps, problems_per_step=args.grpo_problems, group_size=args.grpo_group,
            lr=args.grpo_lr, kl_beta=args.grpo_kl, save_every=0, seed=args.seed, max_minutes=left,
            progress=False, rollout_slots=args.slots, rollout_attention=args.rollout_attention,
            device=args.device if args.device != "cuda" or _cuda() else "cpu",
            lam=GRPOConfigArgs.lam if lam is None else lam,
        )
        t0 = time.monotonic()
        run = train_grpo(cfg)
        spent = (time.monotonic() - t0) / 60
        final = out / "final" if (out / "final").is_dir() else run.last_checkpoint
        if final is None or not is_model(final):
            raise RuntimeError(f"{name}: GRPO wrote no checkpoint under {out}")
        save_checkpoint(final, work / name)
        last = run.metrics[-1] if run.metrics else {}
        record_run(work, name, train_minutes=spent, steps=len(run.metrics), start=start.name, mode=mode,
                   lam=cfg.lam, stopped=run.stopped,
                   last_reward=last.get("reward"), last_format_error_rate=last.get("format_error_rate"))
        log.info("%s: %d steps in %.2f min (%s)", name, len(run.metrics), spent, run.stopped)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ eval
def stage_eval(args: argparse.Namespace) -> None:
    from shared.evaluation import plot_accuracy_latency, plot_accuracy_latency_curves
    from trainer.evaluate import evaluate_model

    work = Path(args.work)
    path = work / "eval.json"
    table: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    ledger = read_ledger(work)["runs"]
    only = {x.strip() for x in args.eval_only.split(",") if x.strip()}
    splits = [s.strip() for s in args.eval_splits.split(",") if s.strip()]
    device = args.device if args.device != "cuda" or _cuda() else "cpu"
    for split in splits:
        entries = table.setdefault(split, {})
        for name, sub, mode, k in EVAL_RUNS:
            if only and name not in only:
                continue
            model_dir = work / sub
            if not is_model(model_dir):
                log.info("eval %s: no model at %s; skipped", name, model_dir)
                continue
            summary = evaluate_model(model_dir, "countdown", mode, split=split, n=args.eval_n, k=k,
                                     device=device, organizer_budget=args.organizer_budget,
                                     worker_budget=args.worker_budget, attention=args.rollout_attention)
            summary["train_minutes"] = _lineage_minutes(ledger, sub)
            entries[name] = summary
            log.info("eval %s on %s: %s", name, split, {k2: v for k2, v in summary.items()
                                                         if k2 not in ("examples", "diagnosis")})
            path.write_text(json.dumps(table, indent=2) + "\n")
        plotted = {k: v for k, v in entries.items() if k in ("asyncthink", "sequential", "parallel")}
        if plotted:
            plot_accuracy_latency(plotted, work / f"eval-{_slug(split)}.png", title=f"countdown, {split}",
                                  metrics=("at_least_1", "at_least_2", "all_correct"))
    budgets = [int(b) for b in args.sweep_budgets.split(",") if b.strip()]
    if budgets and splits:
        curves: dict[str, list[dict[str, Any]]] = {}
        for name, sub, mode in SWEEP_RUNS:
            if not is_model(work / sub):
                continue
            for b in budgets:
                s = evaluate_model(work / sub, "countdown", mode, split=splits[0], n=args.eval_n, device=device,
                                   organizer_budget=b, worker_budget=min(args.worker_budget, b),
                                   attention=args.rollout_attention, examples=0)
                curves.setdefault(name, []).append(s)
        table["sweep"] = {"split": splits[0], "budgets": budgets, "curves": curves}
        path.write_text(json.dumps(table, indent=2) + "\n")
        if curves:
            plot_accuracy_latency_curves(curves, work / "eval-sweep.png", title=f"countdown, {splits[0]}",
                                         metrics=("at_least_1", "all_correct"))


def _lineage_minutes(ledger: dict[str, Any], run: str) -> dict[str, float]:
    """Training minutes of a model and of the runs it started from (grpo-async: sft-async too)."""
    parents = {name: parent for name, parent, *_ in GRPO_RUNS}
    out: dict[str, float] = {}
    while run in ledger or run in parents:
        if run in ledger:
            out[run] = ledger[run]["train_minutes"]
        run = parents.get(run, "")
    return out


def _slug(split: str) -> str:
    return Path(split).stem if split.endswith(".jsonl") else split


# ------------------------------------------------------------------------------------------ export
def stage_export(args: argparse.Namespace) -> None:
    work = Path(args.work)
    src = work / args.export_from
    if not is_model(src):
        raise FileNotFoundError(f"no model at {src} to export")
    dst = Path(args.export_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    log.info("exported %s -> %s (%.1f MiB)", src, dst, checkpoint_bytes(dst) / 2**20)


STAGES = {"synth": stage_synth, "sft": stage_sft, "grpo": stage_grpo, "eval": stage_eval, "export": stage_export}


def build_parser() -> argparse.ArgumentParser:

    default_problems = str(Path(__file__).resolve().parent / "data" / "countdown_train_problems.jsonl")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working directory of the run (stages read and write here)")
    p.add_argument("--stages", default="synth,sft,grpo,eval", help="comma-separated: synth,sft,grpo,eval,export")
    p.add_argument("--problems", default=default_problems, help="JSONL of training problems (never held out)")
    p.add_argument("--train-problems", type=int, default=14_000, help="how many of them to synthesize traces for")
    p.add_argument("--trace-format", choices=("search", "paths"), default="search")
    p.add_argument("--capacity", type=int, default=2, help="pool size c of traces, rollouts and evaluation")
    p.add_argument("--preset", default="small", help="model preset (default small, 8 M parameters)")
    p.add_argument("--max-position", type=int, default=None, help="override the preset's context length")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="GRPO and eval device (default cuda; cpu when none)")
    p.add_argument("--min-minutes", type=float, default=0.002,
                   help="a run this close to its target is done (default 0.002)")
    p.add_argument("--sft-minutes", type=float, default=5.0, help="total SFT minutes of each SFT run")
    p.add_argument("--sft-runs", default="async,seq", help="which SFT runs: async, seq or both (default)")
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--sft-max-steps", type=int, default=-1, help="most SFT steps per session (default: no limit)")
    p.add_argument("--sft-batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=4096, help="longest SFT sequence kept, in tokens")
    p.add_argument("--grpo-minutes", type=float, default=10.0, help="total GRPO minutes of grpo-async and of grpo-seq")
    p.add_argument("--ablation-minutes", type=float, default=None,
                   help="total GRPO minutes of each ablation (default: --grpo-minutes)")
    p.add_argument("--grpo-steps", type=int, default=100_000, help="most GRPO steps per session")
    p.add_argument("--grpo-lr", type=float, default=5e-5)
    p.add_argument("--grpo-kl", type=float, default=0.02, help="β of the KL penalty to the run's start (0 = none)")
    p.add_argument("--grpo-problems", type=int, default=32, help="P: problems per GRPO step")
    p.add_argument("--grpo-group", type=int, default=8, help="G: episodes per problem")
    p.add_argument("--slots", type=int, default=1024, help="rollout slot-engine KV slots")
    p.add_argument("--rollout-attention", default="auto", choices=("auto", "varlen", "masked"))
    p.add_argument("--organizer-budget", type=int, default=2688,
                   help="organizer (and sequential) token budget of rollouts and evaluation (search traces: "
                   "sequential p99 2130, longest 2590 tokens)")
    p.add_argument("--worker-budget", type=int, default=640,
                   help="worker token budget (search units: p99 369, longest 543 tokens)")
    p.add_argument("--eval-n", type=int, default=400, help="problems per evaluation and split (default all 400)")
    p.add_argument("--eval-splits", default="test,test2", help="held-out splits (comma-separated; JSONL paths too)")
    p.add_argument("--eval-only", default="", help="comma-separated evaluation names (default: all)")
    p.add_argument("--sweep-budgets", default="", help="organizer budgets of the accuracy-latency sweep, e.g. 256,512,1024")
    p.add_argument("--export-from", default="grpo-async", help="model directory under --work to export")
    p.add_argument("--export-dir", default="runs/export", help="where export copies it")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:  # refused before any stage runs, not after hours of the earlier ones
        p.error(f"unknown stage {unknown[0]!r}; choose from {sorted(STAGES)}" if unknown else "no stage given")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        _timed(work, stage, STAGES[stage], args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
