"""Admin-facing texts of the improvement loop (``/report``, ``/approve``, loop notices).

Plain text (no parse mode), each message within Telegram's limit. The handlers call:

- ``report_messages(report)`` → the ``/report`` messages (a list: long reports are split);
- ``approve_usage()``, ``approved_text(entry)``, ``approve_error_text(exc)`` for ``/approve``;
- ``cycle_text(result)`` → what the scheduled loop tells admins after a cycle (None: silent).
"""

from __future__ import annotations

from datetime import UTC, datetime

from bot.learning.loop import CycleResult, LearningReport, Proposal
from bot.texts import split_message
from bot.versions import AuditEntry

MESSAGE_LIMIT = 4000


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _clip(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def report_text(report: LearningReport, *, max_patterns: int = 6, max_examples: int = 2,
                example_chars: int = 50) -> str:
    """The whole report as one text (may exceed one message; see :func:`report_messages`)."""
    c = report.credibility
    lines = [
        "🛠 /report — prompt improvement",
        f"loop: {report.mode} · active: {report.active_id or '–'}",
        f"votes of the last 28 days {c.get('votes', 0)} · credible {c.get('credible_votes', 0)} · "
        f"low-trust voters {c.get('low_trust_voters', 0)} of {c.get('voters', 0)} · "
        f"labelled texts {c.get('labelled_texts', 0)}",
        f"trigger: {'yes' if report.trigger.fire else 'no'} — {report.trigger.reason}",
    ]
    if not report.report.versions:
        lines.append("\nNo credible votes yet: nothing to mine.")
    for v in report.report.versions[:3]:
        lines.append("")
        lines.append(f"📌 {v.version_id}: {v.mistakes} mistakes / {v.judged} credibly judged "
                     f"({100 * v.error_rate:.1f}% errors)")
        for p in v.patterns[:max_patterns]:
            lines.append(f"• {p.name} ×{p.count} ({100 * p.share:.0f}%) — {p.description}")
            for e in p.examples[:max_examples]:
                lines.append(f"   “{_clip(e.text, example_chars)}” → {e.label} "
                             f"(said {e.verdict})")
    check = report.last_check
    lines.append("")
    if check is None:
        lines.append("Offline check: none yet.")
    else:
        r = check.result
        verdict = "passed ✅" if r.passed else "refused ❌"
        lines.append(f"Offline check {_when(check.at)}: {r.candidate_id} vs {r.active_id} "
                     f"{verdict}")
        lines.append(f"  {100 * r.candidate_accuracy:.1f}% vs {100 * r.active_accuracy:.1f}% "
                     f"on {r.n} held-out texts (won {r.wins}, lost {r.losses}, "
                     f"p = {r.p_value:.3g}, margin {100 * r.margin:.1f} pts)")
    waiting = [p for p in report.proposals if p.status == "proposed"]
    for w in waiting:
        lines.append(f"⏳ {w.candidate_id} waits for approval: /approve {w.candidate_id}")
    recent = [p for p in report.proposals if p.status != "proposed"][:3]
    if recent:
        lines.append("Recent candidates: " + ", ".join(_proposal_line(p) for p in recent))
    return "\n".join(lines)


def _proposal_line(p: Proposal) -> str:
    return f"{p.candidate_id} {p.status}"


def report_messages(report: LearningReport) -> list[str]:
    """``/report`` as one or more messages, split on line boundaries."""
    return split_message(report_text(report))



def approve_usage() -> str:
    return "Usage: /approve ID — send a mined candidate that passed its offline check to canary"


def approved_text(entry: AuditEntry) -> str:
    return (f"✅ {entry.version_id} is in canary at {100 * entry.share:.0f}% of users; "
            "the decision engine takes it from here (/stats).")


def approve_error_text(exc: Exception) -> str:
    return f"⚠️ cannot approve: {exc}"


def cycle_text(result: CycleResult) -> str | None:
    """The admins' notice after a loop cycle; None when there is nothing to say."""
    if result.action in ("off", "idle"):
        return None
    icon = {"canary": "🚀", "proposed": "📝", "refused": "🛑", "no_candidate": "ℹ️",
            "failed": "⚠️"}.get(result.action, "ℹ️")
    text = f"{icon} improvement loop: {result.message}"
    if result.action == "proposed" and result.candidate_id:
        text += f"\nApprove with /approve {result.candidate_id}"
    return _clip(text, MESSAGE_LIMIT) if len(text) > MESSAGE_LIMIT else text
