"""Tools for exercising the bot without Telegram: a fake Bot API server on loopback."""
