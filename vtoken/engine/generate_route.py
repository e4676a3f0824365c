"""``apply_pruning(model, ..., compile=True)``: the user's ``model.generate`` through :class:`StaticDecoder`.

:func:`route_generate` puts an outermost ``generate`` wrapper on the handle's model (undone by
``handle.remove()``) that hands each call to :class:`GenerateRoute`, which prepares it with the model's own ``generate`` machinery (generation
config, special tokens, lengths, ``_get_logits_processor``, ``_get_stopping_criteria``) and runs
the decode on the static engine. A plain greedy call (no logits processor but token suppression or a minimum length
covering every new token, no stopping criterion but the length and EOS, no streamer, no scores)
keeps the argmax inside the engine's captured step. Otherwise the token choice of each step runs outside it, through its
``next_token`` hook, with the body of ``transformers``' sampling loop: logits processors,
``softmax`` + ``multinomial`` (``do_sample``) or ``argmax``, padding of finished rows, the
streamer, the stopping criteria. Greedy and sampling with the same seed give what
``model.generate`` gives on the dynamic cache.

What it cannot carry (beams, assisted decoding, a cache passed in, ``use_cache=False``, several
sequences per prompt, attention / hidden-state outputs) raises
:class:`vtoken.errors.UnsupportedCallError` before any output, naming ``compile=False``.
"""

from __future__ import annotations

import torch

from vtoken.errors import UnsupportedCallError
from vtoken.hooks import cached_generation_check

__all__ = ["GenerateRoute", "route_generate"]

_OFF = "apply_pruning(..., compile=False) runs it on model.generate's dynamic cache"
_REFUSED_KWARGS = {
    "assistant_model": "assisted (speculative) decoding",
    "past_key_values": "a cache passed in (multi-turn continuation)",
    "negative_prompt_ids": "classifier-free guidance",
    "custom_generate": "a custom generate function",
    "synced_gpus": "synced_gpus",
    "inputs_embeds": "inputs_embeds",
}


def _greedy_in_graph(processors, criteria, prompt: int, new_tokens: int):
    """The token ids to suppress when a greedy call's token choice can stay inside the engine's
    captured step, or None when it cannot (the host then chooses between two steps). It can when
    every logits processor only suppresses tokens at every step of this call (token suppression;
    a minimum length that covers every new token, which masks the EOS at each step) and the
    stopping criteria are only the length and EOS, which the engine applies as ``generate`` does."""
    from transformers.generation import (EosTokenCriteria, MaxLengthCriteria, MinLengthLogitsProcessor,
                                         MinNewTokensLengthLogitsProcessor, SuppressTokensLogitsProcessor)

    suppress = []
    for p in processors:
        if type(p) is SuppressTokensLogitsProcessor:
            ids = p.suppress_tokens
        elif type(p) is MinNewTokensLengthLogitsProcessor and p.min_new_tokens >= new_tokens:
            ids = p.eos_token_id
        elif type(p) is MinLengthLogitsProcessor and p.min_length >= prompt + new_tokens:
            ids = p.eos_token_id
        else:
            return None
        suppress += torch.as_tensor(ids).reshape(-1).tolist()
    if any(type(c) not in (MaxLengthCriteria, EosTokenCriteria) for c in criteria):
        return None
    return sorted(set(suppress))


class GenerateRoute:
    """``generate(original, args, kwargs)``: one ``model.generate`` call on the static engine (the
    :class:`StaticDecoder` is built on the first call and kept: its graphs are reused per shape).
    ``token_choice`` tells how the last call chose its tokens: ``"graph"`` (greedy whose processors
    only suppress tokens: the argmax runs inside the captured step, no host turn per token) or
    ``"host"`` (``transformers``' processors, sampling and criteria between two steps)."""

    def __init__(self, model, **engine_options):
        self.model = model
        self.engine_options = engine_options
        self.decoder = None
        self.token_choice = None

    def _refuse(self, what: str):
        raise UnsupportedCallError(f"compile=True (the static decode engine) does not run {what}; {_OFF}")

    @torch.no_grad()
    def generate(self, args: tuple, kwargs: dict):
        from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList
        from transformers.generation.configuration_utils import GenerationMode

        from vtoken.engine.static_decode import StaticDecoder

        model = self.model
        kwargs = dict(kwargs)
        names = ["inputs", "generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn"]
        if len(args) > len(names):
            self._refuse("positional arguments after prefix_allowed_tokens_fn (pass them by name)")
        for name, value in zip(names, args):
            kwargs[name] = value
        for key, what in _REFUSED_KWARGS.items():
            if kwargs.get(key) is not None and kwargs.get(key) is not False:
                self._refuse(what)
        inputs = kwargs.pop("inputs", None)
        if inputs is not None:
            kwargs["input_ids"] = inputs
        if kwargs.get("input_ids") is None:
            self._refuse("a call without input_ids")
        streamer = kwargs.pop("streamer", None)
        tokenizer = kwargs.pop("tokenizer", None)
        user_processors = kwargs.pop("logits_processor", None)
        user_criteria = kwargs.pop("stopping_criteria", None)
        prefix_fn = kwargs.pop("prefix_allowed_tokens_fn", None)
        gen_in = kwargs.pop("generation_config", None)

        has_default_max_length = (kwargs.get("max_length") is None
                                  and (gen_in is None or gen_in.max_length is None)
                                  and model.generation_config.max_length is None)
        has_default_min_length = (kwargs.get("min_length") is None
                                  and (gen_in is None or gen_in.min_length is None)
                                  and model.generation_config.min_length is None)
        with cached_generation_check(model.config):  # transformers' per-call check, once per state
            config, model_kwargs = model._prepare_generation_config(gen_in, **kwargs)
        mode = config.get_generation_mode(None)
        if config.num_beams is not None and config.num_beams > 1:
            self._refuse(f"beam search (num_beams={config.num_beams})")
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            self._refuse(f"the generation mode {mode.value!r}")
        if config.use_cache is False:
            self._refuse("use_cache=False (it decodes over its own static KV buffers)")
        if (config.num_return_sequences or 1) > 1:
            self._refuse(f"num_return_sequences={config.num_return_sequences}")
        if config.output_attentions or config.output_hidden_states:
            self._refuse("output_attentions / output_hidden_states")
        if config.guidance_scale is not None and config.guidance_scale != 1:
            self._refuse("classifier-free guidance (guidance_scale)")
        for key in ("past_key_values", "cache", "use_cache", "logits_to_keep"):
            if key in ("past_key_values", "cache") and model_kwargs.get(key) is not None:
                self._refuse("a cache passed in (multi-turn continuation)")
            model_kwargs.pop(key, None)

        input_ids = model_kwargs["input_ids"]
        batch, length, dev = input_ids.shape[0], input_ids.shape[1], input_ids.device
        model._prepare_special_tokens(config, model_kwargs.get("attention_mask") is not None, device=dev,
                                      batch_size=batch)
        config = model._prepare_generated_length(
            generation_config=config, has_default_max_length=has_default_max_length,
            has_default_min_length=has_default_min_length, model_input_name="input_ids", inputs_tensor=input_ids,
            input_ids_length=length)
        model._validate_generated_length(config, length, has_default_max_length)
        new_tokens = config.max_length - length
        processors = model._get_logits_processor(
            generation_config=config, input_ids_seq_length=length, encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=prefix_fn,
            logits_processor=user_processors if user_processors is not None else LogitsProcessorList(),
            device=dev, model_kwargs=model_kwargs)
        criteria = model._get_stopping_criteria(
            generation_config=config,
            stopping_criteria=user_criteria if user_criteria is not None else StoppingCriteriaList(),
            tokenizer=tokenizer)

        # the body of transformers' ``_sample`` loop, one call per new token
        pad = config._pad_token_tensor
        has_eos = any(hasattr(c, "eos_token_id") for c in criteria)
        want_dict = config.return_dict_in_generate
        scores = () if (want_dict and config.output_scores) else None
        raw = () if (want_dict and config.output_logits) else None
        state = {"ids": input_ids, "unfinished": torch.ones(batch, dtype=torch.long, device=dev)}

        def next_token(logits):
            if not bool(state["unfinished"].any()):
                return None
            logits = logits.to(copy=True, dtype=torch.float32, device=dev)
            ids = state["ids"]
            processed = processors(ids, logits)
            nonlocal scores, raw
            if scores is not None:
                scores += (processed,)
            if raw is not None:
                raw += (logits,)
            if config.do_sample:
                tokens = torch.multinomial(torch.nn.functional.softmax(processed, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(processed, dim=-1)
            if has_eos:
                tokens = tokens * state["unfinished"] + pad * (1 - state["unfinished"])
            ids = state["ids"] = torch.cat([ids, tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(tokens.cpu())
            state["unfinished"] = state["unfinished"] & ~criteria(ids, scores)
            return tokens

        if self.decoder is None:
            self.decoder = StaticDecoder(model, **self.engine_options)
        in_graph = None if (config.do_sample or streamer is not None or scores is not None or raw is not None) \
            else _greedy_in_graph(processors, criteria, length, new_tokens)
        self.token_choice = "graph" if in_graph is not None else "host"
        try:
            if in_graph is not None:  # plain greedy: the argmax stays inside the captured step
                eos = config._eos_token_tensor
                sequences = self.decoder.generate(
                    max_new_tokens=new_tokens, suppress_tokens=in_graph or None,
                    eos_token_id=None if eos is None else eos.reshape(-1).tolist(),
                    pad_token_id=None if pad is None else int(pad), **model_kwargs)
            else:
                if streamer is not None:
                    streamer.put(input_ids.cpu())
                self.decoder.generate(max_new_tokens=new_tokens, next_token=next_token, **model_kwargs)
                sequences = state["ids"]
        except UnsupportedCallError as err:
            raise UnsupportedCallError(f"{err}; {_OFF}") from err
        if streamer is not None:
            streamer.end()
        if want_dict:
            return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=raw)
        return sequences


def route_generate(handle, **engine_options) -> GenerateRoute:
    """Route ``handle.model.generate`` to the static engine until ``handle.remove()`` (which restores
    the ``generate`` wrapper this one wraps). Returns the route (also ``model.generate.route``)."""
    import functools

    model = handle.model
    route = GenerateRoute(model, **engine_options)
    inner = model.__dict__.get("generate")

    @functools.wraps(model.generate)
    def generate(*args, **kwargs):
        return route.generate(args, kwargs)

    generate.route = route

    def undo():
        if route.decoder is not None:  # merged projection weights get their own storage back
            route.decoder.close()
        if inner is None:
            model.__dict__.pop("generate", None)
        else:
            model.generate = inner

    handle.on_remove(undo)
    model.generate = generate
    return route
