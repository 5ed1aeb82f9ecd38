"""``asyncthink synth`` and ``asyncthink sft``: argument parsing only; the work is in ``trainer/``.

Light to import (only argparse at module level), so ``asyncthink --help`` stays instant. Each verb is
registered by its own function; :func:`register` adds them all to the ``asyncthink`` sub-commands.
"""

from __future__ import annotations

import argparse
from typing import Any

SubParsers = Any  # argparse._SubParsersAction, which is private


def register(sub: SubParsers) -> None:
    """Add the training verbs of this module to the ``asyncthink`` sub-command parser."""
    register_synth(sub)
    register_sft(sub)
    register_grpo(sub)


# ---------------------------------------------------------------------------------------- synth
def register_synth(sub: SubParsers) -> None:
    p = sub.add_parser(
        "synth",
        help="synthesize cold-start organizer/worker (and sequential) traces",
        description="Write checked AsyncThink traces (one JSONL record per agent) from a programmatic "
        "teacher (countdown) or an OpenAI-compatible LLM; prints kept and dropped counts.",
    )
    p.add_argument("--task", default="countdown", help="task name: countdown or sudoku (programmatic teacher), math (--teacher llm)")
    p.add_argument("--n", type=int, default=1000, help="number of training problems (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="problem and skeleton seed (default 1)")
    p.add_argument("--out", required=True, help="output JSONL path")
    p.add_argument("--sequential", action="store_true", help="write sequential traces only (baseline data)")
    p.add_argument("--with-sequential", action="store_true", help="write AsyncThink and sequential traces")
    p.add_argument("--capacity", type=int, default=None, help="pool size c (default: the task's, 2 for countdown)")
    p.add_argument("--topologies", default=None, help="comma-separated skeleton topologies (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="processes for problem generation (default 1)")
    p.add_argument("--problems-file", default=None,
                   help="JSONL of problems (one task payload per line) instead of generating --n from --seed")
    p.add_argument("--teacher", choices=("programmatic", "llm"), default="programmatic", help="who writes traces")
    p.add_argument("--base-url", default=None, help="LLM teacher: OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--model", default=None, help="LLM teacher: model name at the endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="LLM teacher: env var holding the API key")
    p.add_argument("--timeout", type=float, default=120.0, help="LLM teacher: seconds per request (default 120)")
    p.add_argument("--stats-tokenizer", default=None, help="model/tokenizer dir: also print token length stats")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from shared.cli import CliError

    try:
        return _synth(args)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc


def _synth(args: argparse.Namespace) -> int:
    import json
    import os

    from shared.tasks import get_task
    from trainer.synth.dataset import length_stats, synthesize, train_problems
    from trainer.synth.records import write_jsonl

    task = get_task(args.task)
    capacity = args.capacity or task.default_capacity
    topologies = tuple(t.strip() for t in args.topologies.split(",")) if args.topologies else None
    teacher: Any
    if args.teacher == "llm":
        from trainer.synth.llm_teacher import LLMTeacher, LLMTeacherConfig

        extra: dict[str, Any] = {"topologies": topologies} if topologies else {}
        config = LLMTeacherConfig(
            base_url=args.base_url or "",
            model=args.model or "",
            api_key=os.environ.get(args.api_key_env, "EMPTY"),
            timeout_s=args.timeout,
            capacity=capacity,
            **extra,
        )
        teacher = LLMTeacher(task, config)
    else:
        if args.task == "countdown":
            from trainer.synth.teacher import CountdownTeacher

            teacher = CountdownTeacher(task, capacity=capacity, topologies=topologies)
        elif args.task == "sudoku":
            from trainer.synth.sudoku_teacher import SudokuTeacher

            teacher = SudokuTeacher(task, capacity=capacity, topologies=topologies)
        else:
            raise ValueError(
                f"the programmatic teacher covers countdown and sudoku; use --teacher llm for {args.task}"
            )
    if args.problems_file:
        problems = _read_problem_file(task, args.problems_file)
    else:
        problems = train_problems(task, args.n, args.seed, jobs=args.jobs)
    from tqdm import tqdm

    with tqdm(total=len(problems), desc="synth", unit="problem") as bar:
        result = synthesize(
            teacher,
            problems,
            asyncthink=not args.sequential,
            sequential=args.sequential or args.with_sequential,
            seed=args.seed,
            progress=bar.update,
        )
    n = write_jsonl(result.records, args.out)
    print(f"{result.summary()}\nwrote {n} records to {args.out}")
    if args.stats_tokenizer:
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(args.stats_tokenizer, local_files_only=True).backend_tokenizer

        def count(text: str) -> int:
            return len(fast.encode(text, add_special_tokens=False).ids)

        print(json.dumps(length_stats(result.records, count, capacity), indent=1))
    return 0


def _read_problem_file(task: Any, path: str) -> list[Any]:
    import json
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"no problems file {path}")
    problems = []
    for k, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                problems.append(task.problem_from_payload(json.loads(line), f"{Path(path).stem}-{k}"))
            except (ValueError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}:{k}: not a {task.name} problem: {exc}") from exc
    return problems


# ---------------------------------------------------------------------------------------- sft
def register_sft(sub: SubParsers) -> None:
    p = sub.add_parser(
        "sft",
        help="format SFT on synthesized traces (TRL SFTTrainer)",
        description="Fine-tune a local model directory, or build one from a preset with a locally trained "
        "tokenizer, on organizer/worker/sequential records; the loss covers generated tokens only.",
    )
    p.add_argument("--data", nargs="+", required=True, help="JSONL files written by `asyncthink synth`")
    p.add_argument("--out", required=True, help="output directory (checkpoints, final model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default=None, help="local HF model directory to fine-tune")
    src.add_argument("--preset", default=None, help="build from scratch: test (~100k) or small (~8M parameters)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary with --preset (default 4096)")
    p.add_argument("--kinds", default="organizer,worker,sequential", help="record kinds to train on")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--max-length", type=int, default=1024, help="longest record kept, in tokens (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto = on with CUDA)")
    p.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (default 500)")
    p.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default 10)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT has checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=("auto", "trl", "torch"), default="auto",
                   help="trl: TRL's SFTTrainer; torch: a plain loop with the same masks (for machines "
                   "without TRL); auto (default): trl when installed")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="torch engine: stop and save after this many minutes (default 0 = no limit)")
    p.set_defaults(func=cmd_sft)


def cmd_sft(args: argparse.Namespace) -> int:
    import json

    from shared.cli import CliError
    from trainer.sft import run_sft

    try:
        cfg = _sft_config(args)
        metrics = run_sft(cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    print(json.dumps(metrics, indent=1, default=str))
    return 0


def _sft_config(args: argparse.Namespace) -> Any:
    from trainer.sft import SFTConfigArgs

    return SFTConfigArgs(
        data=list(args.data),
        out=args.out,
        model=args.model,
        preset=args.preset,
        vocab_size=args.vocab_size,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        seed=args.seed,
        engine=args.engine,
        max_minutes=args.max_minutes,
        bf16={"auto": None, "on": True, "off": False}[args.bf16],
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        resume=not args.no_resume,
        progress=not args.no_progress,
    )


# ---------------------------------------------------------------------------------------- grpo
GRPO_HELP = """GRPO over thinking structures (DESIGN.md §4): each step runs P problems x G episodes
(organizer plus concurrent workers) through the engine, gives every token an episode generated its
group-relative advantage (joined-in text masked), and updates the model; the rollout backend gets the
new weights after every step. Writes OUT/metrics.jsonl, OUT/checkpoint-<step>/ and OUT/final/.

examples:
  asyncthink grpo --model runs/sft --out runs/grpo --steps 200 --problems-per-step 16 --group-size 8
  asyncthink grpo --model runs/sft-seq --out runs/grpo-seq --mode sequential --steps 200
  asyncthink grpo --model runs/sft --out runs/grpo-nolam --lam 0            # the "without R_η" ablation
  asyncthink grpo --model runs/sft --out runs/grpo --steps 200 --resume --max-minutes 25
"""


def register_grpo(sub: SubParsers) -> None:
    from trainer.grpo.config import add_arguments  # no torch: only the config dataclass

    p = sub.add_parser(
        "grpo",
        help="GRPO over thinking structures (whole-episode rollouts, shared group advantage)",
        description=GRPO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=cmd_grpo)


def cmd_grpo(args: argparse.Namespace) -> int:
    import json

    from shared.cli import CliError
    from trainer.grpo.config import from_namespace

    try:
        config = from_namespace(args)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    from trainer.grpo.loop import train_grpo

    try:
        run = train_grpo(config)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    last = run.metrics[-1] if run.metrics else {}
    summary = {"out": str(run.out), "step": run.step, "stopped": run.stopped,
               "last_checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
               "last_step": last}
    print(json.dumps(summary, indent=1, default=str))
    return 0
