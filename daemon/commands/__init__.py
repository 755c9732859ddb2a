"""The CLI's commands: one module per command or small family, each registering its own subcommands.

`daemon/cli.py` imports them to build its parser; `shared.py` holds what they have in common.
Importing them must stay cheap (every command pays for all of them): they import at module
level only what their parsers need, and the work's modules inside their handlers.
"""
