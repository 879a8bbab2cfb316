"""The language model under the chat task: loading it, and decoding many conversations at once.

* ``loader``: Gemma-3-270M from its packaged GGUF, converted once to safetensors in the cache
  (sha256 recorded), or any local transformers causal-LM folder;
* ``types``: what a caller hands the engine (``Prompt``, ``SamplingParams``) and gets back
  (``Delta``, ``Completion``);
* ``decoder``: the model's forward over a slot KV cache (prefill, batched decode), optionally
  with int8 weights;
* ``engine``: continuous batching, the prefix cache, sampling, stop strings, cancellation;
* ``grammar``: constraints (JSON / JSON schema) that mask the logits as tokens are decoded.

Nothing here knows about images or audio: a ``Prompt`` is token ids plus spans whose input
embeddings the caller supplies (the chat task's projected image / audio tokens).
"""
