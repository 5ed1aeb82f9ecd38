"""Rollout throughput: transformers ``generate`` vs the slot engine, uniform and episode-shaped.

Prints one table (tokens/s; it asserts nothing). For a random Qwen2 model of the shipped size
(≈8.2 M parameters by default), at each batch size:

1. ``hf-static``: transformers ``generate`` with ``cache_implementation="static"`` on a uniform batch
   (``--prompt-len`` prompts, ``--new-tokens`` sampled tokens, ``min_new_tokens`` so no row stops).
   On CUDA transformers compiles the static-cache forward itself; a first, untimed call pays that.
2. ``engine-uniform``: the slot engine on the same batch, eager and with CUDA graphs.
3. ``engine-episodes``: an episode-shaped stream on the engine (CUDA graphs): fresh sequences with
   prompts of 16-128 tokens and a random budget of 16..N new tokens (plus a rare random EOS id), half of
   them continued (same session) with 10-40 injected tokens and a new budget; new sequences are
   admitted as others finish, about ``4 x batch`` fresh sequences in all. Reports tokens/s and the mean
   number of busy slots, over the whole run and over its steady part (until the last fresh sequence is
   submitted, before the pool drains).

Run on the GPU:  ``PYTHONPATH=. python3 bench/rollout_throughput.py``
Check on a CPU:  ``PYTHONPATH=. python3 bench/rollout_throughput.py --device cpu --quick``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.backends.base import GenerateRequest, SamplingParams  # noqa: E402
from trainer.rollout import SlotEngine, SlotEngineConfig, qwen2  # noqa: E402
from trainer.rollout.sampling import SampleMode  # noqa: E402

STOP = r"</FORK-\d+>|<JOIN-\d+>|</RETURN>|</ANSWER>"  # the protocol's stops, so stop checks cost what they do


class TableTokenizer:
    """A fixed id -> 1-3 character table (some with ``<``, ``>``, ``/``): decodes like a real tokenizer."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        chars = "abcdefghijklmnopqrstuvwxyz0123456789 <>/-ANSWERFOKJIT"
        self.table = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 3))) for _ in range(vocab)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.table[i] for i in ids)


def build_model(args: argparse.Namespace) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    cfg = Qwen2Config(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=args.vocab - 1,
        pad_token_id=args.vocab - 1,
        bos_token_id=0,
    )
    return Qwen2ForCausalLM(cfg).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_hf(model: Any, args: argparse.Namespace, bsz: int, device: torch.device) -> tuple[float, float]:
    """(tokens/s, seconds of the untimed first call) for static-cache ``generate``."""
    gen = torch.Generator().manual_seed(bsz)
    ids = torch.randint(0, args.vocab - 1, (bsz, args.prompt_len), generator=gen).to(device)
    kw = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        cache_implementation="static",
        pad_token_id=args.vocab - 1,
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, **kw)
        sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        sync(device)
    elapsed = time.perf_counter() - t0
    new = (out.shape[1] - args.prompt_len) * bsz
    return new / elapsed, warm


def make_engine(
    model: Any,
    tok: TableTokenizer,
    args: argparse.Namespace,
    bsz: int,
    graphs: bool,
    max_len: int,
    attention: str = "auto",
) -> SlotEngine:
    cfg = SlotEngineConfig(
        max_slots=bsz,
        max_len=max_len,
        cuda_graphs=graphs,
        seed=args.seed,
        pipeline_depth=args.pipeline_depth,
        ctx_bucket_step=args.ctx_step,
        decode_attention=attention,
        admit_interval=args.admit_interval,
        admit_batch=args.admit_batch,
    )
    return SlotEngine(model, tok, cfg, device=args.device, eos_token_ids=[])


@contextlib.contextmanager
def stub_forward(engine: SlotEngine, vocab: int, seed: int) -> Iterator[None]:
    """Swap the decode step's forward and sampling for seeded random ids, and prefill for nothing,
    so that a run times the engine's host work alone (``--host-only``)."""
    gen = torch.Generator(device=engine.device).manual_seed(seed)

    def body(bsz: int, n_ctx: int, mode: SampleMode) -> None:
        nxt = torch.randint(0, vocab, (bsz,), generator=gen, device=engine.device)
        engine.sampled[:bsz].copy_(nxt)
        engine.tokens[:bsz].copy_(nxt)
        act = engine.active[:bsz]
        engine.pos[:bsz] += act
        engine.counters[:bsz] += act

    with mock.patch.object(engine, "_body", body), mock.patch.object(qwen2, "prefill", lambda *a, **k: None):
        yield


def greedy_outputs(
    model: Any, tok: TableTokenizer, args: argparse.Namespace, graphs: bool, attention: str
) -> list[list[int]]:
    """Greedy tokens of a mixed batch (admissions mid-run included)."""
    eng = make_engine(model, tok, args, 16, graphs, 256, attention)
    rng = random.Random(5)
    reqs = [
        GenerateRequest(
            [rng.randrange(args.vocab - 1) for _ in range(rng.randint(3, 60))],
            rng.randint(8, 64),
            sampling=SamplingParams(temperature=0),
        )
        for _ in range(24)
    ]
    return [r.output_ids for r in eng.run(reqs)]


def attention_checks(model: Any, tok: TableTokenizer, args: argparse.Namespace, say: Any) -> None:
    """Graph vs eager greedy tokens per attention form; the kernel against the masked form."""
    from trainer.rollout.attention import (
        masked_decode_attention,
        row_lengths,
        varlen_decode_attention,
        visible_columns,
    )

    graph_outputs = {}
    for attention in args.attention.split(","):
        graph_outputs[attention] = greedy_outputs(model, tok, args, True, attention)
        same = greedy_outputs(model, tok, args, False, attention) == graph_outputs[attention]
        say(f"  check ({attention} attention): CUDA-graph greedy tokens == eager greedy tokens: {same}")
    kernel = next((a for a in graph_outputs if a != "masked"), None)
    if "masked" not in graph_outputs or kernel is None:
        return
    device, hd = torch.device(args.device), args.hidden // args.heads
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (64, args.kv_heads, 1025, hd)
    k = torch.randn(shape, generator=gen, device=device).bfloat16()
    v = torch.randn(shape, generator=gen, device=device).bfloat16()
    q = torch.randn(64, args.heads, hd, generator=gen, device=device).bfloat16()
    pos = torch.randint(0, 1024, (64,), generator=gen, device=device)
    visible = visible_columns(pos, 1024)
    ref = masked_decode_attention(q.float(), k.float(), v.float(), visible, hd**-0.5)
    out = varlen_decode_attention(q, k, v, row_lengths(pos, 1024), hd**-0.5).float()
    low = masked_decode_attention(q, k, v, visible, hd**-0.5).float()
    say(
        f"  check: kernel vs fp32 attention, max |diff| {(out - ref).abs().max().item():.2e} "
        f"(masked bfloat16 form: {(low - ref).abs().max().item():.2e})"
    )
    a, b = graph_outputs[kernel], graph_outputs["masked"]
    same = sum(x == y for x, y in zip(a, b, strict=True))
    say(f"  check: greedy requests identical, kernel ({kernel}) vs masked: {same}/{len(a)}")


def bench_uniform(engine: SlotEngine, args: argparse.Namespace, bsz: int) -> dict[str, float]:
    rng = random.Random(bsz)
    hot = SamplingParams(temperature=1.0)

    def reqs(n_new: int) -> list[GenerateRequest]:
        return [
            GenerateRequest(
                [rng.randrange(args.vocab - 1) for _ in range(args.prompt_len)], n_new, sampling=hot
            )
            for _ in range(bsz)
        ]

    engine.capture_graphs((SampleMode.SAMPLE,))
    engine.run(reqs(8))  # warm prefill and the small buckets
    batch = reqs(args.new_tokens)
    engine.reset_stats()
    sync(engine.device)
    t0 = time.perf_counter()
    results = engine.run(batch)
    sync(engine.device)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(r.output_ids) for r in results)
    return {
        "tok_s": tokens / elapsed,
        "active": engine.stats.mean_active,
        "steps": engine.stats.steps,
        "s": elapsed,
    }


def bench_episodes(engine: SlotEngine, args: argparse.Namespace, bsz: int) -> dict[str, float]:
    rng = random.Random(1000 + bsz)
    n_new = args.new_tokens
    eos = args.vocab - 1
    engine.eos_ids = frozenset([eos])  # random weights emit it now and then: an early, random stop
    engine.capture_graphs((SampleMode.SAMPLE,))
    fresh_left = args.episode_factor * bsz
    next_id = 0
    live: dict[int, tuple[GenerateRequest, int]] = {}  # handle -> (request, continuation depth)

    def submit(req: GenerateRequest, depth: int) -> None:
        live[engine.submit(req)] = (req, depth)

    def fresh() -> None:
        nonlocal fresh_left, next_id
        fresh_left -= 1
        next_id += 1
        prompt = [rng.randrange(eos) for _ in range(rng.randint(16, 128))]
        sp = SamplingParams(temperature=1.0, seed=next_id)
        submit(GenerateRequest(prompt, rng.randint(16, n_new), STOP, sp, session=f"ep{next_id}"), 0)

    for _ in range(min(bsz, fresh_left)):
        fresh()
    engine.reset_stats()
    sync(engine.device)
    t0 = time.perf_counter()
    steady: tuple[float, int, int, int] | None = (
        None  # (s, tokens, active slot-steps, steps) at the last fresh
    )
    while engine.has_work:
        if steady is None and fresh_left == 0:
            st = engine.stats
            steady = (time.perf_counter() - t0, st.tokens, st.active_slot_steps, st.steps)
        for handle, result in engine.step():
            req, depth = live.pop(handle)
            full = req.input_ids + result.output_ids
            injected = [rng.randrange(eos) for _ in range(rng.randint(10, 40))]
            room = engine.config.max_len - len(full) - len(injected) - 1
            if depth < 2 and rng.random() < 0.5 and room > 16:
                budget = rng.randint(16, max(16, min(n_new // 2, room)))
                submit(
                    GenerateRequest(full + injected, budget, STOP, req.sampling, session=req.session),
                    depth + 1,
                )
            elif fresh_left > 0:
                fresh()
    sync(engine.device)
    elapsed = time.perf_counter() - t0
    st = engine.stats
    s_s, s_tok, s_act, s_steps = steady or (elapsed, st.tokens, st.active_slot_steps, st.steps)
    return {
        "steady_tok_s": s_tok / s_s,
        "steady_active": s_act / max(1, s_steps),
        "tok_s": st.tokens / elapsed,
        "active": st.mean_active,
        "steps": st.steps,
        "s": elapsed,
        "reused": st.reused_tokens,
        "prefill": st.prefill_tokens,
        "admit_s": st.admit_s,
        "wait_s": st.wait_s,
        "window": st.window_slot_steps / max(1, st.padded_slot_steps),
        "context": st.context_slot_steps / max(1, st.active_slot_steps),
        "prefill_s": st.prefill_s,
        "launch_s": st.launch_s,
        "readback_s": st.readback_s,
        "driver_s": elapsed - st.busy_s,
    }


def _attention_name(engine: SlotEngine) -> str:
    return "varlen kernel" if engine.varlen else "masked window"


def run_episodes(engine: SlotEngine, args: argparse.Namespace, bsz: int, say: Any) -> dict[str, float]:
    """:func:`bench_episodes`, under cProfile when ``bsz`` is ``--profile-batch`` (the top 25 printed)."""
    if bsz != args.profile_batch:
        return bench_episodes(engine, args, bsz)
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    r = prof.runcall(bench_episodes, engine, args, bsz)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    say(buf.getvalue())
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--quick", action="store_true", help="tiny settings to check the script (batches 4,16; 16 tokens)"
    )
    p.add_argument("--batches", default="64,256,1024", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument(
        "--new-tokens", type=int, default=512, help="N: new tokens per uniform row, max per episode segment"
    )
    p.add_argument("--episode-factor", type=int, default=4, help="fresh episode sequences = factor x batch")
    # defaults: trainer/modeling.py's "small" preset, the shipped size (~8.0 M parameters)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--skip-hf", action="store_true", help="leave out transformers generate")
    p.add_argument(
        "--hf-batches", default=None, help="batch sizes for transformers generate (default: --batches)"
    )
    p.add_argument("--skip-eager", action="store_true", help="leave out the eager engine")
    p.add_argument("--skip-uniform", action="store_true", help="leave out engine-uniform")
    p.add_argument(
        "--host-only",
        action="store_true",
        help="episodes only, eager, with the forward replaced by random ids: times the engine's host work",
    )
    p.add_argument(
        "--ctx-step", type=int, default=0, help="SlotEngineConfig.ctx_bucket_step (0: windows double)"
    )
    p.add_argument(
        "--pipeline-depth", type=int, default=None, help="decode steps left in flight (default: the engine's)"
    )
    p.add_argument(
        "--attention",
        default="auto",
        help="comma-separated SlotEngineConfig.decode_attention values to run each batch with "
        "(auto, varlen, masked); 'varlen,masked' also checks the kernel against the masked form",
    )
    p.add_argument(
        "--admit-interval",
        type=int,
        default=SlotEngineConfig.admit_interval,
        help="SlotEngineConfig.admit_interval",
    )
    p.add_argument(
        "--admit-batch",
        type=int,
        default=SlotEngineConfig.admit_batch,
        help="SlotEngineConfig.admit_batch (0: max_slots // 16)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-batch", type=int, default=0, help="cProfile the episode run at this batch size")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.new_tokens, args.prompt_len, args.episode_factor = "4,16", 16, 16, 2
    if args.host_only:
        args.skip_uniform = args.skip_hf = True
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]

    model = build_model(args)
    n_params = sum(t.numel() for t in model.parameters())
    tok = TableTokenizer(args.vocab, args.seed)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    head = [
        f"rollout throughput, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, device: {gpu}, "
        f"torch {torch.__version__}, dtype {str(dtype).removeprefix('torch.')}",
        f"model: Qwen2 {n_params / 1e6:.2f} M params (hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads, mlp {args.intermediate}, vocab {args.vocab}); "
        f"prompts {args.prompt_len}, N = {args.new_tokens} new tokens, temperature 1",
    ]
    rows: list[tuple[str, int, str, str, str]] = []

    log = Path(args.out).with_suffix(".log") if args.out else None

    def say(line: str) -> None:
        print(line, flush=True)
        if log is not None:
            with log.open("a") as f:
                f.write(line + "\n")

    def emit(name: str, bsz: int, tok_s: float, active: str, note: str) -> None:
        rows.append((name, bsz, f"{tok_s / 1e3:9.1f} k", active, note))
        say(f"  {name:<16} batch {bsz:>5}  {tok_s / 1e3:9.1f} k tok/s  active {active:>5}  {note}")

    for line in head:
        say(line)
    if device.type == "cuda":
        attention_checks(model.to(device), tok, args, say)
    uniform_len = args.prompt_len + args.new_tokens + 8
    episode_len = max(uniform_len, 128 + 2 * (args.new_tokens + 40) + 16)
    for bsz, attention in [(b, a) for b in batches for a in args.attention.split(",")]:
        variants = [False, True] if device.type == "cuda" and not args.skip_eager else [False]
        if device.type == "cuda" and args.skip_eager:
            variants = [True]
        for graphs in [] if args.skip_uniform else variants:
            eng = make_engine(model.to(device), tok, args, bsz, graphs, uniform_len, attention)
            r = bench_uniform(eng, args, bsz)
            emit(
                "engine-uniform",
                bsz,
                r["tok_s"],
                f"{r['active']:.0f}",
                f"{'cuda graph' if graphs else 'eager'}, {_attention_name(eng)}, "
                f"{r['steps']:.0f} steps, {r['s']:.2f} s",
            )
            del eng
        graphs = device.type == "cuda" and not args.host_only
        eng = make_engine(model.to(device), tok, args, bsz, graphs, episode_len, attention)
        stub = stub_forward(eng, args.vocab, args.seed) if args.host_only else contextlib.nullcontext()
        with stub:
            r = run_episodes(eng, args, bsz, say)
        emit(
            "episodes-steady",
            bsz,
            r["steady_tok_s"],
            f"{r['steady_active']:.0f}",
            f"{_attention_name(eng)}; the same run, until the last fresh sequence is submitted (no drain tail)",
        )
        kind = "host only (forward stubbed)" if args.host_only else "cuda graph" if graphs else "eager"
        emit(
            "engine-episodes",
            bsz,
            r["tok_s"],
            f"{r['active']:.0f}",
            f"{kind}, {_attention_name(eng)}, {r['steps']:.0f} steps, {r['s']:.2f} s, "
            f"prefill {r['prefill']:.0f} tok, reused {r['reused']:.0f} tok; "
            f"admission {r['admit_s']:.1f} s, device wait {r['wait_s']:.1f} s; "
            f"attention window {r['window']:.0f} columns a row, busy rows' mean context {r['context']:.0f}",
        )
        per_step = 1e3 / max(1.0, r["steps"])
        say(
            f"  host time per step (ms): admission {r['admit_s'] * per_step:.3f} "
            f"(prefill {r['prefill_s'] * per_step:.3f}), launch {r['launch_s'] * per_step:.3f}, "
            f"read-back + stop checks + retire {r['readback_s'] * per_step:.3f}, "
            f"device wait {r['wait_s'] * per_step:.3f}, benchmark driver {r['driver_s'] * per_step:.3f}"
        )
        del eng
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_hf:
        hf_model = model.to(device=device, dtype=dtype)
        for bsz in [int(b) for b in args.hf_batches.split(",")] if args.hf_batches else batches:
            tok_s, warm = bench_hf(hf_model, args, bsz, device)
            emit(
                "hf-static",
                bsz,
                tok_s,
                "-",
                f"generate, cache_implementation=static; first call {warm:.1f} s",
            )
    table = ["", "| generator | batch | tokens/s | mean active | notes |", "|---|---|---|---|---|"]
    table += [f"| {n} | {b} | {t.strip()} | {a} | {note} |" for n, b, t, a, note in rows]
    text = "\n".join(head + table)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
