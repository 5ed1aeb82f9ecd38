"""Training verbs (``model``, ``synth``, ``sft``, ``grpo``): argument parsing only; the work is in ``trainer/``.

Light to import (argparse and the configs' dataclasses at module level; torch only inside the verbs), so
``asyncthink --help`` stays instant. The ``sft`` and ``grpo`` options are generated from
:class:`trainer.sft.SFTConfigArgs` and :class:`trainer.grpo.config.GRPOConfigArgs` (:mod:`cli.options`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cli import CliError
from cli.options import add_options, collect

SubParsers = Any  # argparse._SubParsersAction, which is private


def register(sub: SubParsers) -> None:
    """Add the training verbs to the ``asyncthink`` sub-command parser."""
    register_model(sub)
    register_synth(sub)
    register_sft(sub)
    register_grpo(sub)


# ---------------------------------------------------------------------------------------- model
def register_model(sub: SubParsers) -> None:
    p = sub.add_parser("model", help="build a small random-init model with a locally trained tokenizer",
                       description="Train a tokenizer on protocol-shaped text and build a Qwen2-shaped model "
                       "from a preset (no model hub needed).")
    p.add_argument("out_dir", type=Path, help="directory to write (config, safetensors, tokenizer)")
    p.add_argument("--preset", default="small", help="test (~100 k parameters), tiny (~0.9 M) or small (~8 M; default)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.set_defaults(func=cmd_model)


def cmd_model(args: argparse.Namespace) -> int:
    from trainer.modeling import main as build_main

    build_main([str(args.out_dir), "--preset", args.preset, "--vocab-size", str(args.vocab_size),
                "--seed", str(args.seed)])
    return 0


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
    p.add_argument("--format", choices=("search", "paths"), default="search",
                   help="countdown traces: search (every step written and checkable, candidates verified; "
                   "default) or paths (the first teacher's solver paths, for comparisons)")
    p.add_argument("--base-url", default=None, help="LLM teacher: OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--model", default=None, help="LLM teacher: model name at the endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="LLM teacher: env var holding the API key")
    p.add_argument("--timeout", type=float, default=120.0, help="LLM teacher: seconds per request (default 120)")
    p.add_argument("--stats-tokenizer", default=None,
                   help="model/tokenizer dir: also print token length stats (\"train\": a tokenizer trained on "
                   "the records, as `asyncthink sft --preset` would)")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
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
        if args.task == "countdown" and args.format == "search":
            from trainer.synth.search_teacher import SearchTeacher

            teacher = SearchTeacher(task, capacity=capacity, topologies=topologies)
        elif args.task == "countdown":
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
        from trainer.synth.dataset import token_counter

        count = token_counter(args.stats_tokenizer, result.records, seed=args.seed)
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
    from trainer.sft import SFTConfigArgs  # no torch: the config dataclass only

    p = sub.add_parser(
        "sft",
        help="format SFT on synthesized traces (TRL SFTTrainer)",
        description="Fine-tune a local model directory (--model), or build one from a preset with a locally "
        "trained tokenizer (--preset), on organizer/worker/sequential records; the loss covers generated "
        "tokens only.",
    )
    add_options(p, SFTConfigArgs)
    p.set_defaults(func=cmd_sft)


def cmd_sft(args: argparse.Namespace) -> int:
    import json

    from trainer.sft import SFTConfigArgs, run_sft

    try:
        metrics = run_sft(SFTConfigArgs(**collect(args, SFTConfigArgs)))
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    print(json.dumps(metrics, indent=1, default=str))
    return 0


# ---------------------------------------------------------------------------------------- grpo
GRPO_HELP = """GRPO over thinking structures: each step runs P problems x G episodes
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
    from trainer.grpo.config import GRPOConfigArgs  # no torch: only the config dataclass

    p = sub.add_parser(
        "grpo",
        help="GRPO over thinking structures (whole-episode rollouts, shared group advantage)",
        description=GRPO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, GRPOConfigArgs)
    p.set_defaults(func=cmd_grpo)


def cmd_grpo(args: argparse.Namespace) -> int:
    import json

    from trainer.grpo.config import GRPOConfigArgs

    try:
        config = GRPOConfigArgs(**collect(args, GRPOConfigArgs))
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
