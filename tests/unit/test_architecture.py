"""The package's imports point one way: analytics (pure) ← bot core ← adapters ← command lines.

Every ``import`` is read from the source, including those inside functions and under
``TYPE_CHECKING``, so a hidden upward edge fails here as surely as a top-level one. The last
tests run the same checker on a small tree with a planted upward import and a planted cycle,
so the checker itself is shown to fail when it should.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("analytics", "bot")

# Lower numbers are lower layers; a module may import only from its own layer or below.
PURE, CORE, OPS, TELEGRAM, COMMAND_LINE = range(5)
LAYER_NAMES = {PURE: "analytics (pure)", CORE: "bot core", OPS: "bot.ops adapter",
               TELEGRAM: "bot.telegram adapter", COMMAND_LINE: "command line"}
# Command lines sit on top: they may import anything, nothing imports them.
COMMAND_LINE_MODULES = {"bot.cli", "bot.__main__", "bot.console", "bot.bench",
                        "bot.config_example", "bot.gbstats_check", "bot.gbstats_reference"}
# Libraries that belong to an adapter: the core never sees Telegram, Prometheus or aiohttp.
ADAPTER_LIBRARIES = {"telegram": TELEGRAM, "prometheus_client": OPS, "aiohttp": OPS}


def layer_of(module: str) -> int:
    if module.split(".")[0] == "analytics":
        return PURE
    if module in COMMAND_LINE_MODULES or module.endswith("_cli"):
        return COMMAND_LINE
    if module == "bot.ops" or module.startswith("bot.ops."):
        return OPS
    if module == "bot.telegram" or module.startswith("bot.telegram."):
        return TELEGRAM
    return CORE


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: str
    line: int

    def __str__(self) -> str:
        return (f"{self.path}:{self.line}: {self.source} ({LAYER_NAMES[layer_of(self.source)]}) "
                f"imports {self.target}")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth."""
    module = module_name(root, path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            # `from bot import versions` imports the module bot.versions.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (root / Path(*candidate.split("."))).with_suffix(".py").exists():
                    yield candidate, node.lineno


def edges(root: Path) -> list[Edge]:
    found: list[Edge] = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source = module_name(root, path)
            for target, line in imports_of(root, path):
                if target.split(".")[0] in PACKAGES or target.split(".")[0] in ADAPTER_LIBRARIES:
                    found.append(Edge(source, target, str(path.relative_to(root)), line))
    return found


def upward(found: list[Edge]) -> list[Edge]:
    bad = []
    for edge in found:
        top = edge.target.split(".")[0]
        target_layer = layer_of(edge.target) if top in PACKAGES else ADAPTER_LIBRARIES[top]
        if target_layer > layer_of(edge.source):
            bad.append(edge)
    return bad


def cycles(found: list[Edge]) -> list[list[str]]:
    """Strongly connected groups of project modules (Tarjan), largest first."""
    graph: dict[str, set[str]] = {}
    for edge in found:
        if edge.target.split(".")[0] in PACKAGES and edge.target != edge.source:
            graph.setdefault(edge.source, set()).add(edge.target)
            graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups, key=len, reverse=True)


def test_every_import_points_down_the_layers() -> None:
    bad = upward(edges(ROOT))
    assert not bad, "imports against the layers:\n" + "\n".join(map(str, bad))


def test_no_module_imports_itself_through_others() -> None:
    found = cycles(edges(ROOT))
    assert not found, "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


def test_the_layers_are_what_the_readme_says() -> None:
    assert layer_of("analytics.decide") == PURE
    assert layer_of("bot.service") == layer_of("bot.store.queries") == CORE
    assert layer_of("bot.ops.health") == OPS
    assert layer_of("bot.telegram.app") == TELEGRAM
    assert layer_of("bot.telegram.run_cli") == layer_of("bot.simulate_cli") == COMMAND_LINE


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return tmp_path


def test_the_checker_fails_on_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "bot/service.py": "X = 1\n",
        "bot/telegram/__init__.py": "",
        "bot/telegram/app.py": "from bot import service\n",  # downward: allowed
        "analytics/decide.py": "def f():\n    from bot.service import X\n    return X\n",
        "bot/versions.py": "def g():\n    import bot.telegram.app\n",
        "bot/store.py": "from telegram import Update\n",
    })
    bad = {(e.source, e.target) for e in upward(edges(root))}
    assert bad == {("analytics.decide", "bot.service"), ("bot.versions", "bot.telegram.app"),
                   ("bot.store", "telegram")}


def test_the_checker_finds_a_cycle_within_one_layer(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "analytics/simulate.py": "def f():\n    from analytics import check\n",
        "analytics/check.py": "from analytics.simulate import f\n",
        "analytics/stats.py": "",
    })
    assert cycles(edges(root)) == [["analytics.check", "analytics.simulate"]]


# The database drivers and SQLAlchemy belong to bot.store: every statement the bot, its jobs
# and its command lines run lives there (bot.devtools' throwaway PostgreSQL cluster is a
# test and benchmark tool, not a user of the database).
DATABASE_LIBRARIES = {"sqlite3", "aiosqlite", "sqlalchemy", "asyncpg", "alembic"}


def database_imports(root: Path) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source = module_name(root, path)
            if source.startswith(("bot.store", "bot.devtools")):
                continue
            for target, line in imports_of(root, path):
                if target.split(".")[0] in DATABASE_LIBRARIES:
                    found.append(f"{path.relative_to(root)}:{line}: {source} imports {target}")
    return found


def test_only_the_store_talks_to_the_database() -> None:
    found = database_imports(ROOT)
    assert not found, "database access outside bot/store:\n" + "\n".join(found)


def test_the_database_check_fails_on_sql_outside_the_store(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"bot/store/db.py": "import sqlalchemy\n",
                            "bot/jobs.py": "def f():\n    import sqlite3\n"})
    assert database_imports(root) == ["bot/jobs.py:2: bot.jobs imports sqlite3"]
