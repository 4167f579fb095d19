"""llmsup: a supervisor that serves local LLM inference from a pool of llama.cpp workers.

The layers live at the repository's top (supervisor/, worker/, protocol/); this package
links them under one `llmsup` name so that an import, the layer contracts, type checkers
and an editor all resolve `llmsup.*` from the tree itself (docs/architecture.md).
"""
