"""The shipped model's recipe, end to end, in time-boxed stages (GPU time comes in ~30-minute pieces).

    python -m trainer.recipe --work runs/ship --data-async A.jsonl --data-seq S.jsonl \\
        --problems P.jsonl --stages sft,grpo,eval --sft-minutes 1.4 --grpo-minutes 1.3

Stages (each reads what the earlier ones wrote under ``--work``; each can run in a separate call):

* ``sft``: train one tokenizer on both data sets, build one random-init base model (``--preset``),
  then format SFT twice from that base with the same minutes: ``sft-async`` on the organizer and
  worker traces, ``sft-seq`` on the teacher's sequential traces of the same problems.
* ``grpo``: GRPO from each SFT model with the same minutes: ``grpo-async`` (asyncthink mode, R_η on),
  ``grpo-seq`` (sequential mode: the honest baseline gets the same GPU minutes), and the ablations
  ``grpo-async-nolam`` (λ = 0) and ``grpo-nosft`` (GRPO from the base model, no format SFT; shorter).
* ``eval``: the fixed held-out countdown split (400 problems, none trained on) for every model and
  mode of the model card, plus 4x4 Sudoku zero-shot; writes ``eval.json`` and ``eval.png``.
* ``export``: the AsyncThink model in bf16 safetensors with its tokenizer (the shipped directory).

Every stage records its wall minutes in ``minutes.json``, which the model card quotes. A failing stage
is logged and the recipe goes on with what it has (a half-finished GPU call still returns results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger("recipe")

EVAL_RUNS = (  # (name, model subdirectory, mode, parallel k)
    ("asyncthink", "grpo-async/final", "asyncthink", 1),
    ("sequential", "grpo-seq/final", "sequential", 1),
    ("parallel", "grpo-seq/final", "parallel", 4),
    ("asyncthink-sft-only", "sft-async", "asyncthink", 1),
    ("sequential-sft-only", "sft-seq", "sequential", 1),
    ("ablation-no-r-eta", "grpo-async-nolam/final", "asyncthink", 1),
    ("ablation-no-format-sft", "grpo-nosft/final", "asyncthink", 1),
)


def _record_minutes(work: Path, name: str, minutes: float) -> None:
    path = work / "minutes.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = round(minutes, 3)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _timed(work: Path, name: str, fn: Any, *args: Any, **kw: Any) -> Any:
    t0 = time.monotonic()
    log.info("stage %s: start", name)
    try:
        return fn(*args, **kw)
    except Exception:
        log.error("stage %s failed:\n%s", name, traceback.format_exc())
        return None
    finally:
        minutes = (time.monotonic() - t0) / 60
        _record_minutes(work, name, minutes)
        log.info("stage %s: %.2f min", name, minutes)


# ----------------------------------------------------------------------------------------- sft
def stage_sft(args: argparse.Namespace) -> None:
    from trainer.modeling import build_model
    from trainer.sft import SFTConfigArgs, load_records, run_sft
    from trainer.tokenizer import default_corpus, train_tokenizer

    work = Path(args.work)
    base = work / "base"
    if not (base / "config.json").is_file():
        records = load_records([args.data_async, args.data_seq], ("organizer", "worker", "sequential"))
        corpus = [r.prompt + r.completion for r in records]
        tokenizer = train_tokenizer([*corpus, *default_corpus(seed=args.seed)], args.vocab_size)
        build_model(base, tokenizer, preset=args.preset, seed=args.seed)
    common = dict(model=str(base), engine="torch", max_minutes=args.sft_minutes, epochs=1000.0, lr=args.sft_lr,
                  batch_size=args.sft_batch, max_length=1024, seed=args.seed, progress=False, logging_steps=50,
                  warmup_ratio=0.02)
    wanted = {f"sft-{r.strip()}" for r in args.sft_runs.split(",")}
    for name, data, kinds in (("sft-async", args.data_async, ("organizer", "worker")),
                              ("sft-seq", args.data_seq, ("sequential",))):
        out = work / name
        if name not in wanted:
            continue
        if (out / "model.safetensors").is_file():
            log.info("%s exists; skipped", out)
            continue
        cfg = SFTConfigArgs(data=[data], out=str(out), kinds=kinds, **common)  # type: ignore[arg-type]
        metrics = _timed(work, name, run_sft, cfg)
        log.info("%s: %s", name, {k: v for k, v in (metrics or {}).items() if k != "log"})


# ---------------------------------------------------------------------------------------- grpo
def stage_grpo(args: argparse.Namespace) -> None:
    from shared.episode import EpisodeSettings
    from trainer.grpo import train_grpo
    from trainer.grpo.config import GRPOConfigArgs

    work = Path(args.work)
    runs = (
        ("grpo-async", "sft-async", "asyncthink", None, args.grpo_minutes),
        ("grpo-seq", "sft-seq", "sequential", None, args.seq_grpo_minutes or args.grpo_minutes),
        ("grpo-async-nolam", "sft-async", "asyncthink", 0.0, args.ablation_minutes),
        ("grpo-nosft", "base", "asyncthink", None, args.nosft_minutes),
    )
    for name, start, mode, lam, minutes in runs:
        if minutes <= 0 or (work / name / "final").is_dir() or not (work / start / "config.json").is_file():
            log.info("%s: skipped", name)
            continue
        episode = EpisodeSettings(mode=mode, organizer_budget=args.organizer_budget,
                                  worker_budget=args.worker_budget, temperature=1.0)
        cfg = GRPOConfigArgs(
            model=work / start, out=work / name, task="countdown", episode=episode,
            problems_file=Path(args.problems) if args.problems else None,
            steps=100_000, problems_per_step=args.grpo_problems, group_size=args.grpo_group,
            lr=args.grpo_lr, kl_beta=args.grpo_kl, save_every=0, seed=args.seed, max_minutes=minutes,
            progress=False, rollout_slots=args.slots, rollout_attention=args.rollout_attention,
            lam=GRPOConfigArgs.lam if lam is None else lam,
        )
        run = _timed(work, name, train_grpo, cfg)
        final = work / name / "final"
        if run is not None and not final.is_dir() and run.last_checkpoint is not None:
            run.last_checkpoint.rename(final)  # a time-boxed run ends on its last checkpoint
        if run is not None:
            log.info("%s: %d steps (%s)", name, run.step, run.stopped)


# ---------------------------------------------------------------------------------------- eval
def open_eval_backend(model_dir: Path, device: str, attention: str = "auto") -> Any:
    """The slot engine on CUDA (fast), the transformers backend elsewhere."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        from transformers import AutoTokenizer

        from trainer.rollout import SlotEngine, SlotEngineBackend, SlotEngineConfig

        tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        engine_config = SlotEngineConfig(max_slots=1024, max_len=2048, decode_attention=attention)
        engine = SlotEngine.from_pretrained(str(model_dir), engine_config, tokenizer=tokenizer,
                                            device=torch.device(device))
        return SlotEngineBackend(engine, tokenizer, model_id=model_dir.name, weight_version=model_dir.name)
    from shared.backends.transformers_backend import TransformersBackend

    return TransformersBackend(model_dir, device=device, max_batch=64)


def evaluate_model(model_dir: Path, task_name: str, mode: str, k: int, n: int, device: str,
                   organizer_budget: int, worker_budget: int, attention: str = "auto") -> dict[str, Any]:
    from shared.engine import Engine, EngineConfig
    from shared.evaluation import run_episodes, summarize
    from shared.tasks import get_task
    from shared.tasks.base import Mode

    task = get_task(task_name)
    problems = task.problems("test", n)
    backend = open_eval_backend(model_dir, device, attention)
    config = EngineConfig(mode=Mode(mode), parallel_k=k, organizer_budget=organizer_budget,
                          worker_budget=worker_budget, temperature=0.0 if k == 1 else 0.7, seed=0)
    engine = Engine(backend, task, config)

    async def go() -> Any:
        try:
            return await run_episodes(engine, problems, concurrency=n)
        finally:
            await backend.aclose()

    t0 = time.monotonic()
    results = asyncio.run(go())
    summary = summarize(task.name, results)
    summary["eval_seconds"] = time.monotonic() - t0
    summary["model"] = str(model_dir)
    summary["examples"] = [
        {"problem": r.problem.payload, "answer": r.answer, "status": r.status, "T": r.latency,
         "organizer": r.segments[0].text[:1500] if r.segments else ""}
        for r in results[:3]
    ]
    return summary


def stage_eval(args: argparse.Namespace) -> None:
    from shared.evaluation import plot_accuracy_latency

    work = Path(args.work)
    path = work / "eval.json"
    table: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    runs = [*EVAL_RUNS, ("sudoku-zero-shot", "grpo-async/final", "asyncthink", 1),
            ("sudoku-zero-shot-sft-only", "sft-async", "asyncthink", 1)]
    only = {x.strip() for x in args.eval_only.split(",") if x.strip()}
    for name, sub, mode, k in runs:
        if only and name not in only:
            continue
        model_dir = work / sub
        if not (model_dir / "config.json").is_file():
            log.info("eval %s: no model at %s; skipped", name, model_dir)
            continue
        task = "sudoku" if name.startswith("sudoku") else "countdown"
        n = min(args.eval_n, 100) if task == "sudoku" else args.eval_n
        summary = _timed(work, f"eval-{name}", evaluate_model, model_dir, task, mode, k, n, args.device,
                         args.organizer_budget, args.worker_budget, args.rollout_attention)
        if summary is not None:
            table[name] = summary
            log.info("eval %s: %s", name, {k2: v for k2, v in summary.items() if k2 != "examples"})
            path.write_text(json.dumps(table, indent=2) + "\n")
    plotted = {k: v for k, v in table.items() if k in ("asyncthink", "sequential", "parallel")}
    if plotted:
        plot_accuracy_latency(plotted, work / "eval.png", title="countdown, held-out 400 problems",
                              metrics=("at_least_1", "at_least_2", "all_correct"))


# -------------------------------------------------------------------------------------- export
def stage_export(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.work)
    src = work / args.export_from
    if not (src / "config.json").is_file() and args.export_from == "grpo-async/final":
        src = work / "sft-async"  # GRPO did not run: ship the SFT model
    out = work / "export" / args.export_name
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype=torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(out))
    log.info("exported %s -> %s", src, out)


STAGES = {"sft": stage_sft, "grpo": stage_grpo, "eval": stage_eval, "export": stage_export}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working directory of the run (stages read and write here)")
    p.add_argument("--stages", default="sft,grpo,eval,export", help="comma-separated: sft,grpo,eval,export")
    p.add_argument("--data-async", help="AsyncThink records (asyncthink synth)")
    p.add_argument("--data-seq", help="sequential records of the same problems (asyncthink synth --sequential)")
    p.add_argument("--problems", help="JSONL of training problems for GRPO (never the test split)")
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="eval device (default cuda)")
    p.add_argument("--sft-minutes", type=float, default=1.4, help="minutes per SFT run (both runs get the same)")
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-runs", default="async,seq", help="which SFT runs: async, seq or both (default)")
    p.add_argument("--eval-only", default="", help="comma-separated evaluation names to run (default: all)")
    p.add_argument("--sft-batch", type=int, default=64)
    p.add_argument("--grpo-minutes", type=float, default=1.3, help="minutes for grpo-async and for grpo-seq each")
    p.add_argument("--seq-grpo-minutes", type=float, default=0.0,
                   help="minutes for grpo-seq if not --grpo-minutes (e.g. to match extra SFT minutes of the AsyncThink model)")
    p.add_argument("--ablation-minutes", type=float, default=0.8, help="minutes for the no-R_η ablation")
    p.add_argument("--nosft-minutes", type=float, default=0.4, help="minutes for the no-format-SFT ablation")
    p.add_argument("--grpo-lr", type=float, default=1e-4)
    p.add_argument("--grpo-kl", type=float, default=0.0, help="β of the KL penalty to the SFT model (0 = none)")
    p.add_argument("--grpo-problems", type=int, default=32, help="P: problems per GRPO step")
    p.add_argument("--grpo-group", type=int, default=8, help="G: episodes per problem")
    p.add_argument("--slots", type=int, default=512, help="rollout slot-engine KV slots")
    p.add_argument("--rollout-attention", default="auto", choices=("auto", "varlen", "masked"),
                   help="slot-engine decode attention for GRPO and eval: auto, varlen or masked")
    p.add_argument("--organizer-budget", type=int, default=768)
    p.add_argument("--worker-budget", type=int, default=256)
    p.add_argument("--eval-n", type=int, default=400, help="held-out problems per evaluation (default all 400)")
    p.add_argument("--export-name", default="asyncthink-countdown-small")
    p.add_argument("--export-from", default="grpo-async/final", help="model subdirectory of --work to export")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        if stage not in STAGES:
            p.error(f"unknown stage {stage!r}; choose from {sorted(STAGES)}")
        if stage == "sft" and not (args.data_async and args.data_seq):
            p.error("the sft stage needs --data-async and --data-seq")
        _timed(Path(args.work), f"stage-{stage}", STAGES[stage], args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
