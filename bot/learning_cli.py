"""``loopbot report`` and ``loopbot export``: the improvement report and the credible labelled
set as fine-tuning data.

Export formats (JSONL, one object per line, UTF-8), in the chat-message shapes Hugging Face TRL
reads directly:

- ``sft`` — TRL's *conversational language modeling* format:
  ``{"messages": [{"role": "system", ...}, {"role": "user", "content": TEXT},
  {"role": "assistant", "content": LABEL}]}``
- ``dpo`` — TRL's *conversational preference* format with an explicit prompt:
  ``{"prompt": [system, user], "chosen": [{"role": "assistant", "content": LABEL}],
  "rejected": [{"role": "assistant", "content": WRONG_LABEL}]}``; the rejected label is the
  verdict a version wrongly gave for that text when there was one, else another label.

The system message is the instruction of the active version (or of a version with the same
labels), so the fine-tuned model sees what it will see in production. User texts are
sanitised as for prompts (control tokens and invisible characters removed, whitespace folded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from analytics.credibility import LabelledText
from bot.learning.candidates import sanitize_text
from bot.prompts import PromptVersion

FORMATS = ("sft", "dpo")
# Messages longer than Telegram's limit were cut by the bot anyway.
EXPORT_MAX_CHARS = 4096


def _system_for(item: LabelledText, versions: Mapping[str, PromptVersion],
                active_id: str | None) -> str:
    ordered = ([versions[active_id]] if active_id is not None and active_id in versions
               else []) + [
        v for k, v in sorted(versions.items()) if k != active_id]
    for version in ordered:
        if version.label_names == item.labels:
            return version.system
    return ("Classify the sentiment of the user's message. Answer with exactly one of: "
            + ", ".join(item.labels) + ".")


def _rejected(item: LabelledText) -> str | None:
    wrong = Counter(j.verdict for j in item.judged if j.verdict != item.label)
    if wrong:
        return wrong.most_common(1)[0][0]
    others = [lb for lb in item.labels if lb != item.label]
    return others[0] if others else None


def export_records(labelled: Iterable[LabelledText], fmt: str,
                   versions: Mapping[str, PromptVersion], active_id: str | None = None
                   ) -> Iterator[dict[str, Any]]:
    """One training record per credible labelled text."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    for item in labelled:
        # Fine-tuning tools apply the chat template with special tokens parsed: a typed
        # "<|im_end|>" would forge turns in the training data.
        text = sanitize_text(item.text, max_chars=EXPORT_MAX_CHARS)
        if text is None:
            continue
        system = {"role": "system", "content": _system_for(item, versions, active_id)}
        user = {"role": "user", "content": text}
        if fmt == "sft":
            yield {"messages": [system, user, {"role": "assistant", "content": item.label}]}
            continue
        rejected = _rejected(item)
        if rejected is None:
            continue
        yield {"prompt": [system, user],
               "chosen": [{"role": "assistant", "content": item.label}],
               "rejected": [{"role": "assistant", "content": rejected}]}


def write_jsonl(records: Iterable[dict[str, Any]], out: Path) -> int:
    """Atomically (temp file, then rename): a reader never sees half a file."""
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(out)
    return n


async def _with_db(args: argparse.Namespace) -> tuple[Any, Any]:
    from bot.config import load_settings, resolve_path
    from bot.store.backup import open_configured_database

    settings = load_settings(getattr(args, "config", None),
                             overrides={"storage.db": args.db})
    path = resolve_path(settings, settings.storage.db)
    if not path.is_file():
        raise FileNotFoundError(f"no database at {path} (set storage.db or pass --db)")
    return settings, await open_configured_database(settings)


async def _report(args: argparse.Namespace) -> int:
    from bot.learning.loop import build_report
    from bot.texts.learning import report_text

    settings, db = await _with_db(args)
    try:
        report = await build_report(db, settings)
    finally:
        await db.close()
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2, default=str))
    else:
        print(report_text(report, max_patterns=args.patterns, max_examples=args.examples,
                          example_chars=80))
    return 0


async def _export(args: argparse.Namespace) -> int:
    from analytics.credibility import build_credible_set
    from bot import versions as version_state
    from bot.config import prompts_directory
    from bot.learning.loop import load_vote_records
    from bot.prompts import load_directory

    settings, db = await _with_db(args)
    try:
        records = await load_vote_records(db, settings.telegram.admins)
        deployment = await version_state.load(db)
    finally:
        await db.close()
    credible = build_credible_set(records)
    labelled = [item for item in credible.labelled if item.confidence >= args.min_confidence]
    prompt_versions = await asyncio.to_thread(load_directory, prompts_directory(settings))
    active = deployment.active.version_id if deployment.active else None
    rows = export_records(labelled, args.format, prompt_versions, active)
    n = await asyncio.to_thread(write_jsonl, rows, Path(args.out))
    print(f"wrote {n} {args.format} records from {len(credible.labelled)} credible labelled "
          f"texts ({len(records)} votes) to {args.out}", file=sys.stderr)
    return 0


def _run(coro_fn: Any) -> Any:
    def handler(args: argparse.Namespace) -> int:
        try:
            code: int = asyncio.run(coro_fn(args))
        except FileNotFoundError as exc:
            print(f"loopbot: {exc}", file=sys.stderr)
            return 2
        return code
    return handler


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = subparsers.add_parser(
        "report", help="the prompt improvement report: error patterns, counts, examples, "
        "the last offline check")
    report.add_argument("--db", default=None, help="database (default: storage.db)")
    report.add_argument("--json", action="store_true", help="print one JSON object")
    report.add_argument("--patterns", type=int, default=8, help="patterns per version")
    report.add_argument("--examples", type=int, default=3, help="examples per pattern")
    report.set_defaults(func=_run(_report))

    export = subparsers.add_parser(
        "export", help="write the credible labelled set as JSONL for fine-tuning (TRL formats)")
    export.add_argument("--format", choices=FORMATS, required=True,
                        help="sft: messages; dpo: prompt/chosen/rejected (conversational)")
    export.add_argument("--out", required=True, help="output .jsonl file")
    export.add_argument("--db", default=None, help="database (default: storage.db)")
    export.add_argument("--min-confidence", type=float, default=0.0,
                        help="only texts whose label posterior is at least this")
    export.set_defaults(func=_run(_export))
