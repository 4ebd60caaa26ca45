"""mmrag-lite: a notebook-first course reproducing MMRAG-RFT (arXiv 2512.17194) on one GPU, or offline on a CPU.

The package is layered; each module owns one concept and imports only the ones above it in this list:
atomic, config, data, prompts, parsing, metrics, rewards, modeling, scoring, training, pipeline, evaluation, viz,
widgets, cli/course. Import submodules directly (``from mmrag_lite import rewards``): importing the package
itself stays cheap, so tests and the CLI start fast.
"""

__version__ = "0.1.0"


def _quiet_known_harmless_messages() -> None:
    """Drop two messages every CPU run prints and no student can act on. Nothing else is filtered.

    bitsandbytes looks for an optional hub kernel that it then replaces with its own CPU kernel (docs/modeling.md);
    PEFT and TRL 1.16 still call transformers' renamed ``is_gradient_checkpointing`` whenever a model is prepared, and
    ``gradient_checkpointing_enable`` / ``_disable`` around every generation of a GPU run (renamed in transformers 5).
    """
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated",
                            category=FutureWarning)


_quiet_known_harmless_messages()
