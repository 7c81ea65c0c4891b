"""Tools for exercising the bot without Telegram or real servers: a fake Bot API and a fake
llama-server on loopback, and a throwaway PostgreSQL cluster (tests and benchmarks)."""
