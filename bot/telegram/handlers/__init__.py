"""One module per kind of update: messages, vote buttons, reactions, user and admin commands."""
