"""Runs one vLLM (in-process API) and prints `RESULT <json>` on its last
line. A separate process per engine: vLLM's engine does not go away cleanly
inside one interpreter.

    python run_vllm.py generate <model> <load_format>
    python run_vllm.py embed <model> <load_format>
    python run_vllm.py dump <model> <out_dir>     # the model's state_dict, by vLLM's names
"""

import json
import sys
import time

PROMPTS = ["the quick brown", "a model store", "lazy dog jumps"]


def engine(model, load_format, **extra):
    from vllm import LLM

    return LLM(model=model, load_format=load_format, dtype="float32", max_model_len=128, enforce_eager=True,
               gpu_memory_utilization=0.1, seed=0, **extra)


def save_state(out_dir, model):
    """Runs in vLLM's worker: the model's state_dict as safetensors."""
    from safetensors.torch import save_file

    state = {n: t.detach().cpu().contiguous().clone() for n, t in model.state_dict().items()}
    save_file(state, f"{out_dir}/model.safetensors")
    return sorted(state)


if __name__ == "__main__":
    mode, model, arg = sys.argv[1:4]
    started = time.time()
    if mode == "generate":
        from vllm import SamplingParams

        llm = engine(model, arg)
        ready = time.time() - started
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))
        result = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "text": [o.outputs[0].text for o in outs]}
    elif mode == "embed":
        llm = engine(model, arg, runner="pooling")
        ready = time.time() - started
        result = {"embeddings": [o.outputs.embedding for o in llm.embed(PROMPTS)]}
    elif mode == "dump":
        llm = engine(model, "auto")
        ready = time.time() - started
        import functools

        result = {"names": llm.apply_model(functools.partial(save_state, arg))[0]}
    else:
        raise SystemExit(f"unknown mode {mode}")
    result["ready_s"] = ready
    print("RESULT " + json.dumps(result), flush=True)
    # vLLM's engine shutdown at interpreter exit sometimes aborts (the
    # pooling runner: "terminate called without an active exception");
    # that is vLLM's teardown, not the load under test. Shut the engine
    # down, then leave without running the interpreter's finalizers.
    import os

    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        os._exit(0)
