"""The reference side of the vLLM tests, in a process of its own: ``python reference_worker.py`` reads one JSON
request per line on stdin and writes one JSON reply per line on stdout.

A vLLM engine built in the test process changes transformers' classes there (its Transformers backend decorates
the model's decoder class for torch.compile, process-wide), so ``dip_ext.from_pretrained`` runs here, where no
engine ever ran. Request: ``{"op": "greedy" | "logprobs" | "shortfalls", "folder": str, "dtype": "float32" | "bfloat16",
"prompts": [[int]], "max_tokens": int, "continuations": [[int]]}`` (``max_tokens`` for "greedy", ``continuations``
for "shortfalls" only); reply: ``{"result": ...}`` (greedy: the continuations; logprobs: per prompt, the
log-probability of each token after the first; shortfalls: per continuation, :func:`vllm_helpers.reference_shortfalls`
after its prompt), or ``{"error": str}``.
"""

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]


def main() -> None:
    import torch
    from vllm_helpers import reference, reference_greedy, reference_logprobs, reference_shortfalls

    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # whatever the libraries print stays off the reply channel
    torch.set_num_threads(1)
    models = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            key = (request["folder"], request["dtype"])
            if key not in models:
                models[key] = reference(request["folder"], getattr(torch, request["dtype"]))
            model, prompts = models[key], request["prompts"]
            if request["op"] == "greedy":
                result = reference_greedy(model, prompts, request["max_tokens"])
            elif request["op"] == "logprobs":
                result = [reference_logprobs(model, p).tolist() for p in prompts]
            elif request["op"] == "shortfalls":
                result = [reference_shortfalls(model, p + c, len(p)).tolist()
                          for p, c in zip(prompts, request["continuations"])]
            else:
                raise ValueError(f"unknown op {request['op']!r}")
            reply = {"result": result}
        except Exception as e:  # noqa: BLE001 - the test process raises it with its message
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
