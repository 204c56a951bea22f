"""`python -m experiment <command>`: the launcher. Flags -> config -> one library call."""
