"""Faults injected into a real database, the same way on SQLite and PostgreSQL: a trigger
that makes every audit-log insert fail, as a crash between a state write and its audit entry
of the same transaction would."""

from __future__ import annotations

from bot.store.db import Database


async def fail_audit_inserts(db: Database, message: str = "injected crash") -> None:
    async with db.transaction() as conn:
        if db.is_postgresql:
            await conn.execute(
                "CREATE FUNCTION fail_audit_fn() RETURNS trigger LANGUAGE plpgsql AS"
                f" $$ BEGIN RAISE EXCEPTION '{message}'; END $$")
            await conn.execute("CREATE TRIGGER fail_audit BEFORE INSERT ON audit_log"
                               " FOR EACH ROW EXECUTE FUNCTION fail_audit_fn()")
        else:
            await conn.execute("CREATE TRIGGER fail_audit BEFORE INSERT ON audit_log"
                               f" BEGIN SELECT RAISE(ABORT, '{message}'); END")


async def stop_failing_audit_inserts(db: Database) -> None:
    async with db.transaction() as conn:
        if db.is_postgresql:
            await conn.execute("DROP TRIGGER fail_audit ON audit_log")
            await conn.execute("DROP FUNCTION fail_audit_fn()")
        else:
            await conn.execute("DROP TRIGGER fail_audit")
