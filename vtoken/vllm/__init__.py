"""vtoken inside vLLM: visual tokens pruned after the vision tower of vLLM's Qwen2-VL / Qwen2.5-VL / LLaVA.

Installed with ``pip install -e '.[vllm]'`` into a vLLM environment (``benchmarks/vllm/build_env.sh``
builds one); vLLM loads :func:`vtoken.vllm.registration.register` from its ``vllm.general_plugins``
entry point in every process it starts. The method and budget are set per server by environment
variables (:mod:`vtoken.vllm.config`): ``VTOKEN_METHOD=divprune VTOKEN_KEEP=0.25 vllm serve ...``.
Without ``VTOKEN_METHOD`` the plugin registers nothing and vLLM is unchanged.

One job per module:

| module | job |
| --- | --- |
| ``config.py`` | the server's method and budget from the environment; refuses methods that need the LLM's attention |
| ``selection.py`` | the kept token indices of one image from its embeddings and grid (vtoken's own scorer) |
| ``positions.py`` | M-RoPE positions (Qwen's grid; LLaVA's 1-D positions as equal rows) of a prompt whose images keep fewer tokens (kept tokens at their unpruned positions) |
| ``model.py`` | the vLLM model classes and multimodal processors, and the vision-tower probe (the only module that imports vLLM) |
| ``registration.py`` | the entry point: registers the model classes over vLLM's own |
"""
