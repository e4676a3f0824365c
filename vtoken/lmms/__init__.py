"""vtoken as an lmms-eval model: ``python -m lmms_eval --model vtoken --model_args
pretrained=PATH,method=fastv,keep=64 --tasks ...`` (``pip install "vtoken[lmms]"``).

Registration: lmms-eval (0.7.x) reads its model manifests from the Python entry-point group
``lmms_eval.models``; vtoken's ``pyproject.toml`` declares ``vtoken = "vtoken.lmms.registration:manifest"``
there, so installing vtoken is all it takes (no ``--include_path``, no ``LMMS_EVAL_PLUGINS``).

Modules, one job each:

* :mod:`vtoken.lmms.registration` — the manifest lmms-eval's registry loads (model id ``vtoken``);
* :mod:`vtoken.lmms.model` — :class:`~vtoken.lmms.model.VTokenLMMS`, the lmms-eval model class
  (``generate_until``; loglikelihood is refused with the reason);
* :mod:`vtoken.lmms.batching` — requests grouped by task and generation settings, in document order,
  cut into batches;
* :mod:`vtoken.lmms.answer` — prompts and inputs for a batch (built-in checkpoints through
  ``vtoken.zoo.answer``, other models through their chat template; several images, video);
* :mod:`vtoken.lmms.accounting` — the kept-token accounting (the handle's stats per question, the
  ``handle.stats.summary()`` lines), logged and written to
  ``vtoken_token_accounting_<method>_<keep>_<date>.json``.

The model, its loading and the pruned ``generate`` are :mod:`vtoken.eval.backend`'s (the same
:class:`~vtoken.eval.backend.ModelBackend` ``vtoken eval`` uses), so a question answered here and by
``vtoken eval`` with the same checkpoint, method, budget and batch gets the same prediction.
Nothing here imports ``lmms_eval`` at package import.
"""

__all__: list = []
