"""``loopbot bench``: verdict latency with and without the prefix cache, against the floor;
decode speed alone and batched; memory.

Everything is measured side by side in one run on one model, interleaved message by message,
so the ratios hold whatever else the machine is doing. The floor is one bare llama.cpp
evaluation, from the same cached state, of exactly the tokens a verdict must evaluate after
its cached prefix: the cached verdict cannot go below it. Decoding is measured for one reply
alone and for ``model.parallel_replies`` replies at once (alternated), counting only the time
of decode steps. ``rss_mb`` is this process's peak resident memory (``VmHWM``) while it holds
what ``loopbot run`` holds: the same model contexts (after a full batch of replies), the
Telegram application and its libraries, an open database.

``--load N`` drives ``loopbot run`` itself instead (:mod:`bot.bench_load_cli`); ``--store``
measures only the database: vote commit latency on SQLite and PostgreSQL (:mod:`bot.bench_store`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.bench_load_cli import peak_rss_mb
from bot.config import ModelConfig, Settings, load_settings, prompts_directory
from bot.llm.backends.base import Backend
from bot.prompts import PromptVersion, load_directory

if TYPE_CHECKING:
    from bot.llm.runtime import ModelRuntime

# Typical chat-length messages, Chinese and English, as users send them.
MESSAGES = (
    "这家餐厅的菜味道不错，服务员也很热情，下次还会再来。",
    "快递太慢了，等了整整一个星期才到，包装还破了。",
    "I love how easy this app is to use, great job!",
    "The battery dies after two hours, really disappointed.",
    "手机用了一个月，运行流畅，拍照效果也很好，性价比很高。",
    "客服态度很差，问了三遍都没人回复。",
    "Honestly the movie was too long and the ending made no sense.",
    "Thanks for the quick reply, that solved my problem 👍",
    "房间干净整洁，离地铁站很近，就是隔音有点差。",
    "这本书写得太精彩了，一口气读完了！",
    "Not bad for the price, but the strap broke in a week.",
    "今天心情很好，和朋友一起去公园散步了。",
)


def default_bench_model(settings: Settings) -> Path:
    """The qwen1.5-0.5b-shaped Q8_0 test model, built once in the cache folder (by a child
    process, so that building it does not count in this process's peak memory)."""
    cache = Path(os.environ.get("LOOPBOT_CACHE", "~/.cache/loopbot")).expanduser() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "qwen1.5-0.5b-shape-q8_0.gguf"
    if not path.exists():
        print(f"building the benchmark model {path} (once)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "bot", "model", "make-test", str(path),
                        "--shape", "qwen1.5-0.5b", "--quant", "q8_0"], check=True)
    return path


def _p50(values: list[float]) -> float:
    return statistics.median(values)


async def _hold_what_the_bot_holds(folder: Path) -> Any:
    """What ``loopbot run`` holds besides the model: its libraries (Telegram, the decision
    engine, charts), the Application and an open database. The runtime is the bot's own."""
    from bot.store.db import Database
    from bot.telegram.app import build_application

    settings = load_settings(None, env={"TELEGRAM_BOT_TOKEN": "1:bench"},
                             overrides={"storage.db": str(folder / "bench.db")})
    app = build_application(settings)
    db = await Database.open(folder / "bench.db")
    return app, db


async def measure(model_path: Path, config: ModelConfig, version: PromptVersion, *,
                  rounds: int, decode_tokens: int) -> dict[str, Any]:
    from bot.llm.runtime import ModelRuntime

    with tempfile.TemporaryDirectory(prefix="loopbot-bench-") as tmp:
        app, db = await _hold_what_the_bot_holds(Path(tmp))
        runtime = ModelRuntime(model_path, config)
        await runtime.start()
        try:
            result = await _measure(runtime, version, rounds=rounds,
                                    decode_tokens=decode_tokens)
        finally:
            await runtime.close()
            await db.close()
        del app
    return {"model": str(model_path), "threads": config.n_threads or os.cpu_count(),
            "kv_cache_type": config.kv_cache_type, **result,
            "rss_mb": round(peak_rss_mb(), 1)}


async def _measure(runtime: ModelRuntime, version: PromptVersion, *, rounds: int,
                   decode_tokens: int) -> dict[str, Any]:
    prefix_tokens = await runtime.call(
        lambda b: b.prepare(version))  # type: ignore[attr-defined]
    cached: list[float] = []
    uncached: list[float] = []
    floor: list[float] = []
    query_tokens: list[int] = []

    def bare_eval(backend: Backend, text: str) -> float:
        tokens, _ = backend.query_tokens(text)  # type: ignore[attr-defined]
        query_tokens.append(len(tokens))
        started = time.perf_counter()
        backend.raw_decode(version, tokens)  # type: ignore[attr-defined]
        return (time.perf_counter() - started) * 1000.0

    # Warm-up: page the weights in and settle the thread pool.
    for text in MESSAGES[:2]:
        await runtime.classify(version, text)
        await runtime.call(lambda b, t=text: bare_eval(b, t))  # type: ignore[misc]
    query_tokens.clear()
    for i in range(rounds):
        text = MESSAGES[i % len(MESSAGES)]
        # Alternate the order so neither measurement always follows the other.
        order = ("cached", "floor", "uncached") if i % 2 else ("floor", "cached", "uncached")
        for kind in order:
            if kind == "cached":
                started = time.perf_counter()
                await runtime.classify(version, text)
                cached.append((time.perf_counter() - started) * 1000.0)
            elif kind == "floor":
                floor.append(await runtime.call(
                    lambda b, t=text: bare_eval(b, t)))  # type: ignore[misc]
            else:
                started = time.perf_counter()
                await runtime.classify(version, text, use_cache=False)
                uncached.append((time.perf_counter() - started) * 1000.0)

    # Decoding: one reply alone, then as many at once as the runtime generates together,
    # each the same number of tokens; the rate counts only the decode steps' time.
    gen_version = replace(version, generation=replace(
        version.generation, max_tokens=decode_tokens, temperature=0.0))

    async def decode_rate(count: int) -> tuple[float, int]:
        totals = runtime.reply_totals
        tokens, seconds = totals.decode_tokens, totals.decode_s
        replies = await asyncio.gather(*[
            runtime.reply(gen_version, [], MESSAGES[i % len(MESSAGES)], timeout=600)
            for i in range(count)])
        await runtime.call(lambda b: None)  # the worker has logged the busy period
        tokens, seconds = totals.decode_tokens - tokens, totals.decode_s - seconds
        return (tokens / seconds if seconds > 0 else 0.0), sum(r.tokens for r in replies)

    # Alternated twice: whatever else the machine does weighs on both alike.
    parallel = runtime.parallel_replies
    singles, batches = [], []
    for _ in range(2):
        rate, n_tok = await decode_rate(1)
        singles.append(rate)
        batches.append((await decode_rate(parallel))[0])
    single, batched = statistics.fmean(singles), statistics.fmean(batches)
    verdict = _p50(cached)
    return {
        "prompt_version": version.id,
        "prefix_tokens": prefix_tokens,
        "query_tokens_mean": statistics.fmean(query_tokens),
        "rounds": rounds,
        "verdict_ms_p50": round(verdict, 3),
        "verdict_uncached_ms_p50": round(_p50(uncached), 3),
        "floor_ms_p50": round(_p50(floor), 3),
        "verdict_over_floor": round(verdict / _p50(floor), 3),
        "uncached_over_cached": round(_p50(uncached) / verdict, 3),
        "decode_tok_s": round(single, 2),
        "decode_tokens": n_tok,
        "parallel_replies": parallel,
        "decode_tok_s_batched": round(batched, 2),
        "decode_speedup": round(batched / single, 3) if single > 0 else 0.0,
    }


def run(args: argparse.Namespace) -> int:
    if args.store:
        return _run_store(args)
    settings = load_settings(args.config, overrides={"model.path": args.model,
                                                     "model.n_threads": args.threads})
    model = Path(args.model) if args.model else default_bench_model(settings)
    versions = load_directory(prompts_directory(settings))
    version_id = args.prompt or settings.prompts.default_version
    if version_id not in versions:
        print(f"loopbot bench: no prompt version '{version_id}'", file=sys.stderr)
        return 2
    if args.load:
        from bot.bench_load_cli import run_load

        result = run_load(model, prompts_directory(settings), messages=MESSAGES, chats=args.load,
                          rounds=args.rounds or 2,
                          threads=settings.model.n_threads or os.cpu_count() or 1,
                          parallel_replies=args.parallel_replies,
                          baseline=not args.no_baseline, conversations=args.conversations,
                          extra_settings={"model": _model_settings(settings)})
    else:
        result = asyncio.run(measure(model, settings.model, versions[version_id],
                                     rounds=args.rounds or 24,
                                     decode_tokens=args.decode_tokens))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0


def _run_store(args: argparse.Namespace) -> int:
    """``--store``: the storage benchmark only (no settings, no model)."""
    from bot.bench_store import format_table, parse_rates, run_store_bench

    try:
        rates = parse_rates(args.store_rates)
        if not args.store_seconds > 0:
            raise ValueError(f"--store-seconds {args.store_seconds:g}: must be positive")
        result = run_store_bench(store_url=args.store_url, seconds=args.store_seconds,
                                 rates=rates)
    except ValueError as exc:
        print(f"loopbot bench: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _model_settings(settings: Settings) -> dict[str, Any]:
    """The model settings of this run (its --config), for the bots under load."""
    from dataclasses import asdict

    skip = {"path", "model_dir", "fetch_repo", "fetch_file", "fetch_sha256", "fetch_base_url"}
    return {k: v for k, v in asdict(settings.model).items() if k not in skip}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure verdict latency (cached, uncached, floor), decode speed, memory")
    parser.add_argument("--model", default=None,
                        help="GGUF file (default: a qwen1.5-0.5b-shaped Q8_0 test model, built "
                        "once in ~/.cache/loopbot/bench)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--prompt", default=None, help="prompt version id")
    parser.add_argument("--rounds", type=int, default=None,
                        help="messages per measurement (default 24); with --load, the rounds "
                        "in which every chat writes once (default 2)")
    parser.add_argument("--decode-tokens", type=int, default=48,
                        help="tokens generated for the decode-speed measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="load test: N chats write to `loopbot run` (against a fake Bot "
                        "API) at once, each round; compared with the sequential baseline")
    parser.add_argument("--parallel-replies", type=int, default=None,
                        help="with --load: model.parallel_replies of the bot under test "
                        "(default: the configured value)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="with --load: skip the sequential baseline (parallel_replies 1)")
    parser.add_argument("--conversations", action="store_true",
                        help="with --load: the same chats write every round (their history "
                        "grows) instead of new chats each round")
    parser.add_argument("--store", action="store_true",
                        help="measure only the database: vote commit latency p50/p99 on "
                        "SQLite and PostgreSQL at 50 and 500 writes/s (no model is loaded)")
    parser.add_argument("--store-url", default=None, metavar="URL",
                        help="with --store: the PostgreSQL database to write to (it gets the "
                        "schema and benchmark rows: use an empty one); default: a throwaway "
                        "durable cluster, if the PostgreSQL server binaries are installed")
    parser.add_argument("--store-seconds", type=float, default=10.0, metavar="S",
                        help="with --store: seconds of load per database and rate (default 10)")
    # Tests: other rates than 50 and 500 writes/s, e.g. "20,50".
    parser.add_argument("--store-rates", default="50,500", help=argparse.SUPPRESS)
    parser.set_defaults(func=run)
