"""``arbiter``: one command line for every component.

It sits above the core library and the deployables (``arbiter``, ``services``,
``trainer``) and is the only package that imports all three. ``cli.main`` holds
the entry point; ``cli.commands`` holds one module per command or command group.
Only the command that argv names is imported and given its arguments, and its
implementation is imported when it runs, so ``arbiter --help`` is fast and a
command pays only for the libraries it uses.
"""
