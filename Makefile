# Two commands do all the set-up on a fresh machine:
#   make run    installs what is missing, then starts the console on the default model
#               (fetching it first, with a progress bar, when none is configured)
#   make test   installs what is missing, then runs the whole test suite (CI runs this)
.PHONY: run test bot lint bench setup

setup:
	@bash scripts/bootstrap.sh

run: setup
	.venv/bin/loopbot console $(ARGS)

bot: setup
	.venv/bin/loopbot run $(ARGS)

test: setup
	.venv/bin/ruff check bot analytics tests
	.venv/bin/mypy
	.venv/bin/python -m pytest -q $(ARGS)

bench: setup
	.venv/bin/loopbot bench $(ARGS)
