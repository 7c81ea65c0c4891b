"""``loopbot model fetch | info | make-test``: getting, inspecting and faking model files."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from typing import Any


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    model = subparsers.add_parser("model", help="download, inspect or generate GGUF model files")
    sub = model.add_subparsers(dest="model_command", metavar="{fetch,info,make-test}")
    sub.required = True

    fetch = sub.add_parser("fetch", help="download the configured model (resumable, checked)")
    fetch.add_argument("--repo", help="Hugging Face repository (default: model.fetch_repo)")
    fetch.add_argument("--file", help="file in the repository (default: model.fetch_file)")
    fetch.add_argument("--dir", help="destination folder (default: model.model_dir)")
    fetch.add_argument("--sha256", help="expected SHA-256 (default: model.fetch_sha256)")
    fetch.add_argument("--base-url", help="mirror root (default: model.fetch_base_url)")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(func=_fetch)

    info = sub.add_parser("info", help="print a GGUF file's metadata without loading it")
    info.add_argument("path", help="GGUF file")
    info.add_argument("--json", action="store_true", help="one JSON object instead of text")
    info.set_defaults(func=_info)

    make = sub.add_parser("make-test", help="write a random-weight qwen2 GGUF for tests/benchmarks")
    make.add_argument("path", help="output GGUF file")
    make.add_argument("--shape", choices=["tiny", "qwen1.5-0.5b"], default="tiny")
    make.add_argument("--quant", choices=["f16", "q8_0"], default="f16")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(func=_make_test)


def _fetch(args: argparse.Namespace) -> int:
    from bot.config import ConfigError, load_settings, resolve_path
    from bot.llm.fetch import FetchError, fetch_model

    try:
        settings = load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"loopbot: {exc}", file=sys.stderr)
        return 2
    cfg = settings.model
    dest_dir = resolve_path(settings, args.dir or cfg.model_dir)
    repo = args.repo or cfg.fetch_repo
    filename = args.file or cfg.fetch_file
    print(f"fetching {filename} from {repo} into {dest_dir}", file=sys.stderr)
    try:
        path = fetch_model(
            repo,
            filename,
            dest_dir,
            sha256=args.sha256 or cfg.fetch_sha256 or None,
            base_url=args.base_url or cfg.fetch_base_url,
            progress=not args.quiet,
        )
    except FetchError as exc:
        print(f"loopbot: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _info(args: argparse.Namespace) -> int:
    from bot.llm.gguf_info import GGUFError, describe, read_gguf_info

    try:
        info = read_gguf_info(args.path)
    except GGUFError as exc:
        print(f"loopbot: {exc}", file=sys.stderr)
        return 1
    if args.json:
        bulky = {"metadata", "array_lengths", "tensors"}
        data: dict[str, Any] = {
            f.name: getattr(info, f.name) for f in fields(info) if f.name not in bulky
        }
        data["path"] = str(info.path)
        data["special_tokens"] = {str(k): v for k, v in info.special_tokens.items()}
        print(json.dumps(data, ensure_ascii=False))
    else:
        print("\n".join(describe(info)))
    return 0


def _make_test(args: argparse.Namespace) -> int:
    from bot.llm.testmodel import ModelBuildError, make_test_model

    started = time.monotonic()
    try:
        path = make_test_model(args.path, shape=args.shape, quant=args.quant, seed=args.seed)
    except (ModelBuildError, OSError) as exc:
        print(f"loopbot: {exc}", file=sys.stderr)
        return 1
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({args.shape}, {args.quant}, {size_mb:.1f} MB, "
          f"{time.monotonic() - started:.1f} s)")
    return 0
