"""Everything the bot says, in Chinese and English, chosen by the user's Telegram language."""

from __future__ import annotations

ZH = "zh"
EN = "en"

# Telegram's hard limit is 4096 characters; a margin keeps us clear of edge cases with
# characters Telegram counts differently (it counts UTF-16 code units).
MESSAGE_LIMIT = 4000

_TEXTS: dict[str, dict[str, str]] = {
    "start": {
        ZH: "你好！我是 loopbot。发给我任何一句话，我会判断它的情感并和你聊天。\n"
            "判断对不对？请点 ✅ 或 ❌ —— 你的反馈会让我越来越准。\n"
            "/help 查看帮助，/privacy 查看隐私说明。",
        EN: "Hi! I'm loopbot. Send me any message: I'll tell you its sentiment and chat "
            "with you.\nWas my verdict right? Tap ✅ or ❌ - your feedback makes me better.\n"
            "/help for help, /privacy for what I store.",
    },
    "help": {
        ZH: "发一条文字消息：我先给出情感判断（带 ✅/❌ 按钮），再回复你。\n"
            "对我的回复点 👍/👎 表情也算反馈。\n"
            "/privacy 隐私说明 · /forget 删除你的所有消息和反馈",
        EN: "Send a text message: first I give a sentiment verdict (with ✅/❌ buttons), "
            "then a reply.\nReacting 👍/👎 to my replies counts as feedback too.\n"
            "/privacy what is stored · /forget delete all your messages and votes",
    },
    "help_admin": {
        ZH: "管理员命令：/stats /versions /rollback /promote ID /canary ID PERCENT /retire ID "
            "/export /report /approve ID",
        EN: "Admin commands: /stats /versions /rollback /promote ID /canary ID PERCENT "
            "/retire ID /export /report /approve ID",
    },
    "privacy": {
        ZH: "我保存：你的 Telegram 用户 ID、聊天 ID、消息文字、我的判断和回复、"
            "你的 ✅/❌ 反馈和表情。"
            "用途：改进情感判断（比较不同的提示词版本）。\n"
            "消息文字保存 {retention}，之后删除（反馈和统计保留）。\n"
            "被纠正的短句可能（不含你的 ID）作为示例写入新的提示词版本。\n"
            "/forget 会立即删除你的所有消息和反馈。",
        EN: "I store: your Telegram user id, the chat id, your message texts, my verdicts and "
            "replies, your ✅/❌ votes and reactions. Purpose: improving the sentiment verdicts "
            "(comparing prompt versions).\nMessage texts are kept for {retention}, then erased "
            "(votes and statistics stay).\nShort corrected sentences may become examples in "
            "new prompt versions, without your id.\n"
            "/forget deletes all your messages and votes at once.",
    },
    "retention_days": {ZH: "{days} 天", EN: "{days} days"},
    "retention_forever": {ZH: "不限期", EN: "no fixed limit"},
    "forgotten": {
        ZH: "已删除：{interactions} 条消息，{votes} 条反馈，{reactions} 个表情。",
        EN: "Deleted: {interactions} messages, {votes} votes, {reactions} reactions.",
    },
    "forget_not_anonymous": {
        ZH: "这条命令是以群组或频道的名义发送的，无法确定是谁。"
            "请用你自己的账号私聊我发送 /forget。",
        EN: "This command was sent on behalf of a group or channel, so I cannot tell whose "
            "data it means. Send /forget from your own account in a private chat with me.",
    },
    "verdict": {ZH: "{emoji} {label} · {percent}%", EN: "{emoji} {label} · {percent}%"},
    "btn_correct": {ZH: "✅ 对", EN: "✅ right"},
    "btn_wrong": {ZH: "❌ 错", EN: "❌ wrong"},
    "btn_chosen": {ZH: "{text} ✔", EN: "{text} ✔"},
    "vote_thanks_correct": {ZH: "谢谢！已记为正确 ✅", EN: "Thanks! Recorded as right ✅"},
    "vote_thanks_wrong": {ZH: "谢谢！已记为错误 ❌", EN: "Thanks! Recorded as wrong ❌"},
    "vote_pick_label": {ZH: "谢谢！正确的是哪个？", EN: "Thanks! Which one is right?"},
    "vote_thanks_label": {ZH: "谢谢！已记为「{label}」", EN: "Thanks! Recorded as '{label}'"},
    "vote_stale": {
        ZH: "这个按钮已失效，没有记录任何内容。",
        EN: "This button is no longer valid; nothing was recorded.",
    },
    "non_text": {
        ZH: "我只看得懂文字消息 🙂 请发一句话给我。",
        EN: "I can only read text messages 🙂 Please send me some words.",
    },
    "rate_limited": {
        ZH: "你发得太快了，请稍等几秒再发 🙏",
        EN: "You're sending messages a bit fast - please wait a few seconds 🙏",
    },
    "busy": {
        ZH: "我现在太忙了，请稍后再试一次 🙏",
        EN: "I'm busy right now, please try again in a moment 🙏",
    },
    "no_test_running": {
        ZH: "现在没有正在进行的测试，没有可导出的事件。",
        EN: "No test is running: there are no events to export.",
    },
    "events_caption": {
        ZH: "{n} 个事件（loopbot replay 可读取的格式）",
        EN: "{n} events, in the format `loopbot replay` reads",
    },
    "group_busy": {
        ZH: "这个群里的消息太多了，我一时回复不过来：接下来的提问我先跳过，请稍后再 @ 我 🙏",
        EN: "Too many messages in this group for me right now: I'm skipping new ones for a "
            "moment - please mention me again a little later 🙏",
    },
    "restarted": {
        ZH: "抱歉，我刚才重启了，没来得及回复这条消息。请再发一次 🙏",
        EN: "Sorry, I was restarting and missed this message. Please send it again 🙏",
    },
    "timeout": {
        ZH: "这次想得太久了，请再发一次试试。",
        EN: "That took too long - please try sending it again.",
    },
    "error": {
        ZH: "抱歉，出了点问题，请稍后再试。",
        EN: "Sorry, something went wrong. Please try again later.",
    },
    "truncated": {
        ZH: "（消息太长，我只读了前 {chars} 个字）",
        EN: "(Your message was long; I only read the first {chars} characters.)",
    },
    "empty_reply": {ZH: "……", EN: "..."},
    "admin_private_only": {
        ZH: "管理员命令只能在与我的私聊中使用。",
        EN: "Admin commands work only in a private chat with me.",
    },
    "not_admin": {
        ZH: "抱歉，这个命令只有管理员可以用。",
        EN: "Sorry, this command is for admins only.",
    },
    "usage_promote": {ZH: "用法：/promote 版本ID", EN: "Usage: /promote VERSION_ID"},
    "usage_canary": {
        ZH: "用法：/canary 版本ID 百分比（例如 /canary v2-zh 10）",
        EN: "Usage: /canary VERSION_ID PERCENT (e.g. /canary v2-zh 10)",
    },
    "usage_retire": {
        ZH: "用法：/retire 版本ID（停止一个候选版本，它的用户回到活跃版本）",
        EN: "Usage: /retire VERSION_ID (stops a candidate; its users go back to the active "
            "version)",
    },
    "retired": {
        ZH: "⏹ {version} 不再提供服务；{active} 服务所有用户。",
        EN: "⏹ {version} is no longer served; {active} serves everyone.",
    },
    "export_too_large": {
        ZH: "导出文件太大（压缩后 {mb} MB），超过 Telegram 的上限。请在服务器上用 "
            "`loopbot backup` 取得数据。",
        EN: "The export is too large for Telegram ({mb} MB compressed). Take the data on the "
            "server with `loopbot backup`.",
    },
    "refused": {ZH: "未执行：{reason}", EN: "Not done: {reason}"},
    "promoted": {
        ZH: "✅ {version} 现在是活跃版本（之前：{previous}）。",
        EN: "✅ {version} is now the active version (before: {previous}).",
    },
    "rolled_back": {
        ZH: "↩️ 已回滚到 {version}（撤下：{previous}）。",
        EN: "↩️ Rolled back to {version} (withdrawn: {previous}).",
    },
    "canary_set": {
        ZH: "🐤 {version} 现在服务 {percent}% 的用户。",
        EN: "🐤 {version} now serves {percent}% of users.",
    },
    "no_votes": {ZH: "还没有任何反馈。", EN: "No votes yet."},
    "export_caption": {ZH: "{n} 条反馈", EN: "{n} votes"},
    # The database refuses writes (Database.accepting_writes is False): say so, not silence.
    "temporarily_unavailable": {
        ZH: "抱歉，我暂时无法保存消息和反馈，所以现在没法回复。请稍后再试 🙏",
        EN: "Sorry, I can't store messages or votes right now, so I can't answer at the "
            "moment. Please try again a little later 🙏",
    },
}


def language_of(language_code: str | None) -> str:
    """Chinese for any ``zh*`` Telegram language, English for everything else."""
    return ZH if (language_code or "").lower().startswith("zh") else EN


def t(key: str, lang: str, **values: object) -> str:
    variants = _TEXTS[key]
    text = variants.get(lang) or variants[EN]
    return text.format(**values) if values else text


def retention_text(days: int, lang: str) -> str:
    if days <= 0:
        return t("retention_forever", lang)
    return t("retention_days", lang, days=days)


def utf16_len(text: str) -> int:
    """Length as Telegram counts it (UTF-16 code units: an emoji may count twice)."""
    return len(text.encode("utf-16-le")) // 2


def _fitting_prefix(text: str, limit: int) -> int:
    """How many characters of ``text`` fit in ``limit`` UTF-16 units."""
    units = 0
    for i, ch in enumerate(text):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > limit:
            return i
    return len(text)


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Cut a long text into pieces of at most ``limit`` UTF-16 units, preferring paragraph,
    line, sentence and word boundaries, so each piece reads on its own."""
    if limit < 2:
        raise ValueError("limit must be at least 2")
    pieces: list[str] = []
    rest = text.strip()
    while utf16_len(rest) > limit:
        size = _fitting_prefix(rest, limit)
        window = rest[:size]
        cut = size
        for sep in ("\n\n", "\n", "。", ". ", "！", "？", "! ", "? ", " "):
            pos = window.rfind(sep)
            # A boundary in the first half would leave a uselessly short piece.
            if pos >= size // 2:
                cut = pos + len(sep)
                break
        piece = rest[:cut].rstrip()
        if not piece:
            piece, cut = rest[:size], size
        pieces.append(piece)
        rest = rest[cut:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces
