"""``loopbot bench``: verdict latency with and without the prefix cache, against the floor.

Everything is measured side by side in one run on one model, interleaved message by message,
so the ratios hold whatever else the machine is doing. The floor is one bare llama.cpp
evaluation, from the same cached state, of exactly the tokens a verdict must evaluate after
its cached prefix: the cached verdict cannot go below it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bot.config import ModelConfig, Settings, load_settings, prompts_directory
from bot.llm.backends.base import Backend
from bot.prompts import PromptVersion, load_directory

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
    """The qwen1.5-0.5b-shaped Q8_0 test model, built once in the cache folder."""
    from bot.llm.testmodel import make_test_model

    cache = Path(os.environ.get("LOOPBOT_CACHE", "~/.cache/loopbot")).expanduser() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "qwen1.5-0.5b-shape-q8_0.gguf"
    if not path.exists():
        print(f"building the benchmark model {path} (once)...", file=sys.stderr)
        make_test_model(path, shape="qwen1.5-0.5b", quant="q8_0")
    return path


def _p50(values: list[float]) -> float:
    return statistics.median(values)


async def measure(model_path: Path, config: ModelConfig, version: PromptVersion, *,
                  rounds: int, decode_tokens: int) -> dict[str, Any]:
    from bot.llm.runtime import ModelRuntime

    runtime = ModelRuntime(model_path, config)
    await runtime.start()
    try:
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

        def decode_speed(backend: Backend) -> tuple[int, float]:
            from dataclasses import replace

            gen_version = replace(version, generation=replace(
                version.generation, max_tokens=decode_tokens, temperature=0.0))
            first: float | None = None
            count = 0
            for _ in backend.generate(gen_version, [], MESSAGES[0]):
                count += 1
                if first is None:
                    first = time.perf_counter()
            elapsed = time.perf_counter() - (first or time.perf_counter())
            return count, elapsed

        n_tok, seconds = await runtime.call(decode_speed, timeout=600)
    finally:
        await runtime.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    verdict = _p50(cached)
    return {
        "model": str(model_path),
        "threads": config.n_threads or os.cpu_count(),
        "prompt_version": version.id,
        "prefix_tokens": prefix_tokens,
        "query_tokens_mean": statistics.fmean(query_tokens),
        "rounds": rounds,
        "verdict_ms_p50": round(verdict, 3),
        "verdict_uncached_ms_p50": round(_p50(uncached), 3),
        "floor_ms_p50": round(_p50(floor), 3),
        "verdict_over_floor": round(verdict / _p50(floor), 3),
        "uncached_over_cached": round(_p50(uncached) / verdict, 3),
        "decode_tok_s": round((n_tok - 1) / seconds, 2) if n_tok > 1 and seconds > 0 else 0.0,
        "decode_tokens": n_tok,
        "rss_mb": round(rss_mb, 1),
    }


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, overrides={"model.path": args.model,
                                                     "model.n_threads": args.threads})
    model = Path(args.model) if args.model else default_bench_model(settings)
    versions = load_directory(prompts_directory(settings))
    version_id = args.prompt or settings.prompts.default_version
    if version_id not in versions:
        print(f"loopbot bench: no prompt version '{version_id}'", file=sys.stderr)
        return 2
    result = asyncio.run(measure(model, settings.model, versions[version_id],
                                 rounds=args.rounds, decode_tokens=args.decode_tokens))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure verdict latency (cached, uncached, floor), decode speed, memory")
    parser.add_argument("--model", default=None,
                        help="GGUF file (default: a qwen1.5-0.5b-shaped Q8_0 test model, built "
                        "once in ~/.cache/loopbot/bench)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--prompt", default=None, help="prompt version id")
    parser.add_argument("--rounds", type=int, default=24, help="messages per measurement")
    parser.add_argument("--decode-tokens", type=int, default=48,
                        help="tokens generated for the decode-speed measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)
