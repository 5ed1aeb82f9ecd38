"""The cheap CPU check before any GPU time: do the search traces teach a small model fewer invalid answers?

    PYTHONPATH=. python bench/trace_check.py --minutes 4 --eval-n 50

What it does, in order (every step bounded; ``--minutes`` is the SFT time of *each* model):

1. Synthesizes AsyncThink traces (organizer and worker records) and sequential traces for the same
   training problems with both countdown teachers: ``paths`` (the first teacher: solver paths, what the shipped models learned)
   and ``search`` (:mod:`trainer.synth.search_teacher`: every step written, candidates verified).
2. Replays every teacher answer through the task's verifier: each must be valid and distinct (the
   synthesis checks already enforce it; this counts them again, independently).
3. Measures token lengths of both (one tokenizer trained on both data sets).
4. Builds one random-init model (``--preset``, default ``tiny``, about 0.9 M parameters) and trains a
   copy on each data set for the same ``--minutes`` of format SFT (plain torch loop, same settings),
   counted in CPU time of the process (all its threads), so that other work on the machine does not
   give one model more training than the other.
   By default on the worker records only (``--records worker``): a worker's unit is where candidate
   solutions are made, in both formats, and a few CPU minutes are enough to teach a 1 M model that much
   but not a whole organizer; ``--records all`` trains on organizer and worker records.
5. Evaluates both as workers (:func:`trainer.evaluate.evaluate_workers`): every first-pair unit of
   ``--eval-n`` problems of a held-out split, prompted with the query both teachers fork
   (``a b | c d -> t``), greedy. Reported: units that return, candidates per unit, the rate of invalid
   and of bare-number candidates, the rate of false ``x op y=z`` statements in the text, and problems
   with at least one valid candidate. With ``--records all`` also whole AsyncThink episodes (the tools
   on), diagnosed (:mod:`trainer.diagnose`): ≥1 correct, format errors, candidates, invalid and bare
   answer expressions.

It prints the table (and writes ``--work``/trace_check.json). Limits: minutes of CPU teach a 1 M model
the format and some arithmetic, not the task; the check is about what such a model puts forward as a
solution, not about accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

TRAIN_FILE = ROOT / "trainer" / "data" / "countdown_train_problems.jsonl"
FORMATS = ("paths", "search")


def synth(fmt: str, problems: list[Any], *, sequential: bool, seed: int) -> Any:
    from shared.tasks.countdown import CountdownTask
    from trainer.synth.dataset import synthesize
    from trainer.synth.search_teacher import SearchTeacher
    from trainer.synth.teacher import CountdownTeacher

    task = CountdownTask()
    teacher = SearchTeacher(task) if fmt == "search" else CountdownTeacher(task)
    return synthesize(teacher, problems, asyncthink=True, sequential=sequential, seed=seed)


def replay(records: list[Any], problems: dict[str, Any]) -> dict[str, int]:
    """Every teacher answer through the verifier: answers, expressions, and any invalid or duplicate."""
    from shared.protocol import Answer, Role, parse
    from shared.tasks.countdown import CountdownTask

    task = CountdownTask()
    out = {"answers": 0, "expressions": 0, "invalid": 0, "duplicate": 0, "bare": 0}
    for rec in records:
        if rec.kind == "worker":
            continue
        events, _ = parse(rec.completion, Role.ORGANIZER, capacity=1 << 20)
        answer = next(e for e in events if isinstance(e, Answer))
        score = task.score(problems[rec.problem_id], answer.text)
        out["answers"] += 1
        out["expressions"] += score.correct + len(score.details["invalid"]) + len(score.details["duplicate"])
        out["invalid"] += len(score.details["invalid"])
        out["duplicate"] += len(score.details["duplicate"])
        out["bare"] += sum(e.strip().isdigit() for e in answer.text.split(";"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=4.0,
                   help="SFT minutes of each model, counted in CPU time of the process (default 4)")
    p.add_argument("--problems", type=int, default=3000, help="training problems (the committed train file)")
    p.add_argument("--eval-n", type=int, default=50, help="held-out problems per evaluation (default 50)")
    p.add_argument("--split", default="test", help="held-out split (default test; test2 or a JSONL path)")
    p.add_argument("--preset", default="tiny", help="model preset (default tiny, ~0.9 M parameters)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-length", type=int, default=2048, help="longest training sequence kept, in tokens")
    p.add_argument("--organizer-budget", type=int, default=2048)
    p.add_argument("--worker-budget", type=int, default=512)
    p.add_argument("--records", choices=("worker", "all"), default="worker",
                   help="train on worker records (default) or on organizer and worker records (then also "
                   "evaluate whole AsyncThink episodes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/trace-check", help="working directory (data, models, json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from shared.tasks.countdown import CountdownTask
    from trainer.evaluate import evaluate_model, evaluate_workers
    from trainer.modeling import build_model, count_parameters
    from trainer.sft import SFTConfigArgs, run_sft
    from trainer.synth.dataset import length_stats, token_counter
    from trainer.synth.records import write_jsonl
    from trainer.tokenizer import default_corpus, train_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    task = CountdownTask()
    problems = task.problems(str(TRAIN_FILE), args.problems)
    by_id = {p.id: p for p in problems}
    t0 = time.monotonic()
    data: dict[str, Any] = {}
    for fmt in FORMATS:
        res = synth(fmt, problems, sequential=True, seed=args.seed)
        data[fmt] = res
        write_jsonl(res.records, work / f"{fmt}.jsonl")
        print(f"{fmt}: {res.summary()}", flush=True)
    report: dict[str, Any] = {"settings": vars(args), "formats": {}}
    all_records = [r for fmt in FORMATS for r in data[fmt].records]
    count = token_counter("train", all_records, vocab_size=args.vocab_size, seed=args.seed)
    for fmt in FORMATS:
        rep = replay(data[fmt].records, by_id)
        stats = length_stats(data[fmt].records, count)
        report["formats"][fmt] = {"synth": data[fmt].summary(), "replay": rep, "lengths": stats}
        print(f"{fmt}: replayed {rep['answers']} teacher answers, {rep['expressions']} expressions: "
              f"{rep['invalid']} invalid, {rep['duplicate']} duplicate, {rep['bare']} bare numbers", flush=True)

    base = work / "base"
    corpus = [r.prompt + r.completion for r in all_records]
    tokenizer = train_tokenizer([*corpus, *default_corpus(seed=args.seed)], args.vocab_size)
    model = build_model(base, tokenizer, preset=args.preset, seed=args.seed)
    n_params = count_parameters(model)
    print(f"base model: {n_params:,} parameters, vocabulary {len(tokenizer)} (synthesis "
          f"{time.monotonic() - t0:.0f} s)", flush=True)
    kinds = ("worker",) if args.records == "worker" else ("organizer", "worker")
    rows: list[dict[str, Any]] = []
    for fmt in FORMATS:
        out = work / f"{fmt}-{args.records}"
        cfg = SFTConfigArgs(data=[str(work / f"{fmt}.jsonl")], out=str(out), model=str(base), kinds=kinds,
                            engine="torch", epochs=1000.0, max_minutes=args.minutes, lr=args.lr,
                            batch_size=args.batch, max_length=args.max_length, seed=args.seed,
                            progress=False, warmup_ratio=0.05, logging_steps=25, eval_records=16, clock="cpu")
        metrics = run_sft(cfg)
        w = evaluate_workers(out, split=args.split, n=args.eval_n, device="cpu", budget=args.worker_budget)
        row: dict[str, Any] = {
            "traces": fmt, "records": args.records, "sft_steps": metrics["global_step"],
            "sft_minutes": round(metrics["train_runtime"] / 60, 2), "sft_cpu_minutes": round(metrics["train_clock_s"] / 60, 2),
            "loss": round(metrics["loss_after"], 3),
            "units": w["units"], "returned": w["returned_pct"], "candidates": w["candidates_per_unit"],
            "invalid_cand": w["invalid_candidates_pct"], "bare_cand": w["bare_candidates_pct"],
            "wrong_arith": w["wrong_statements_pct"], "valid_problems": w["problems_with_a_valid_candidate_pct"],
        }
        report["formats"][fmt]["sft"] = {k: v for k, v in metrics.items() if k != "log"}
        report["formats"][fmt]["workers"] = w
        if args.records == "all":
            summary = evaluate_model(out, "countdown", "asyncthink", split=args.split, n=args.eval_n,
                                     device="cpu", organizer_budget=args.organizer_budget,
                                     worker_budget=args.worker_budget, examples=2)
            d = summary["diagnosis"]
            row.update({
                "at_least_1": summary["at_least_1"], "format_err": summary["format_error_rate"],
                "mean_T": summary["mean_latency"], "ep_candidates": d["candidates_per_episode"],
                "ep_invalid_cand": d["invalid_candidates_pct"], "invalid_ans": d["invalid_answer_exprs_pct"],
                "bare_ans": d["bare_answer_exprs_pct"],
            })
            report["formats"][fmt]["episodes"] = summary
        rows.append(row)
        print(f"{fmt}: {row}", flush=True)
    report["rows"] = rows
    (work / "trace_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(length_table(report["formats"]))
    print()
    print(table(rows, n_params, args))
    return 0


def length_table(formats: dict[str, Any]) -> str:
    """Token lengths of the traces of each format (generated tokens; T of the AsyncThink episodes)."""
    lines = ["| traces | kind | n | mean | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|---|---|"]
    for fmt, rep in formats.items():
        for kind in ("organizer_tokens", "worker_tokens", "sequential_tokens", "critical_path_T"):
            st = rep["lengths"].get(kind, {})
            if st.get("n"):
                cells = [st["n"], round(st["mean"]), st["p50"], st["p90"], st["p99"], st["max"]]
                lines.append(f"| {fmt} | {kind.removesuffix('_tokens')} | " + " | ".join(map(str, cells)) + " |")
        ratio = rep["lengths"].get("T_over_sequential", {})
        if ratio.get("n"):
            lines.append(f"| {fmt} | T / sequential | {ratio['n']} | {ratio['mean']:.2f} | {ratio['p50']:.2f} | "
                         f"{ratio['p90']:.2f} | {ratio['p99']:.2f} | {ratio['max']:.2f} |")
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], n_params: int, args: argparse.Namespace) -> str:
    """The markdown table the README quotes."""
    records = "worker records" if args.records == "worker" else "organizer and worker records"
    head = (f"{n_params / 1e6:.2f} M-parameter model, {args.minutes:g} CPU-minutes of format SFT on the "
            f"{records} of each format, greedy, as a worker on every first-pair unit of "
            f"{args.eval_n} problems of the {args.split} split\n\n")
    cols = [("traces", "traces"), ("sft_steps", "SFT steps"), ("loss", "loss"), ("units", "units"),
            ("returned", "returned %"), ("candidates", "candidates / unit"), ("invalid_cand", "invalid cand. %"),
            ("bare_cand", "bare-number cand. %"), ("wrong_arith", "false x op y=z %"),
            ("valid_problems", "problems with a valid cand. %")]
    if any("at_least_1" in r for r in rows):
        cols += [("at_least_1", "episodes ≥1 %"), ("format_err", "format err %"), ("ep_candidates", "cand. / ep"),
                 ("ep_invalid_cand", "ep invalid cand. %"), ("invalid_ans", "invalid answer %"),
                 ("bare_ans", "bare answer %"), ("mean_T", "mean T")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k]) for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


if __name__ == "__main__":
    random.seed(0)
    raise SystemExit(main())
