"""mmrag-lite: a notebook-first course reproducing MMRAG-RFT (arXiv 2512.17194) on one GPU, or offline on a CPU.

The package is layered; each module owns one concept and imports only the ones above it in this list:
atomic, config, data, prompts, parsing, metrics, rewards, modeling, scoring, training, pipeline, evaluation, viz,
widgets, cli/course. Import submodules directly (``from mmrag_lite import rewards``): importing the package
itself stays cheap, so tests and the CLI start fast.
"""

__version__ = "0.1.0"


def _quiet_known_harmless_messages() -> None:
    """Drop one message every CPU run prints: bitsandbytes looking for an optional hub kernel that it then
    replaces with its own CPU kernel (docs/modeling.md). Nothing else is filtered."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )


_quiet_known_harmless_messages()
