"""How one sequence picks its tokens: llama.cpp's sampler chain for the request's sampling
fields, and a grammar (GBNF, or a JSON schema's grammar.py made) that every token must
fit.

Greedy decoding without penalty, bias or grammar needs no chain: one argmax over the logits
(Llama.sample with None), the fast path. Otherwise the chain is llama.cpp's usual order:
logit bias, penalties, then top-k, top-p, min-p, temperature and the seeded draw (or the
argmax when greedy).

A grammar is checked as llama.cpp's common sampler does (common/sampling.cpp): the chain
picks a token from the whole vocabulary without the grammar, and only that one token is
checked against it; only when the grammar rejects it are the logits filtered by the
grammar over the whole vocabulary and the chain run again on what is left. Checking every
candidate each step would cost a pass of the grammar over 49,152 (SmolLM2) or 262,144
(Gemma 3) tokens per token. Where it gives the same token, a rejection is first settled
among the 256 likeliest tokens only (_pick_from_shortlist).
"""

from __future__ import annotations

import ctypes
import math

import numpy

from llmsup.protocol.messages import Sampling

SHORTLIST = 256  # tokens a rejected pick is first settled among (_pick_from_shortlist)


class Sampler:
    """One sequence's sampler: `pick(index)` samples from the last decode's row `index`,
    `close()` frees it. `rejections` counts the tokens the grammar turned down."""

    def __init__(self, llama, sampling: Sampling, grammar: str | None = None):
        self.llama = llama
        self.lib = lib = llama.lib
        # Greedy on the model's own logits needs no chain: one argmax (grammar or not).
        self.chain = None if sampling.greedy and sampling.unbiased else self._chain(sampling)
        self.grammar = None
        self.rejections = 0
        if grammar is not None:
            self.grammar = lib.llama_sampler_init_grammar(llama.vocab, grammar.encode(), b"root")
            if not self.grammar:
                self.close()
                raise ValueError("llama.cpp could not parse the grammar")
            self._one = numpy.zeros(1, llama.candidates.dtype)
            self._few = numpy.zeros(SHORTLIST, llama.candidates.dtype)
            # Whether a rejection may be settled among the likeliest tokens (see
            # _pick_from_shortlist): greedy without a chain, or plain top-k sampling.
            self.top_k = sampling.top_k
            self.shortlist = self.chain is None or (
                not sampling.greedy and sampling.unbiased and 0 < sampling.top_k <= SHORTLIST
            )
            self._one_array = lib.llama_token_data_array(
                self._one.ctypes.data_as(lib.llama_token_data_p), 1, -1, False
            )

    def _chain(self, s: Sampling):
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        parts = []
        if s.logit_bias:
            n_vocab = self.llama.n_vocab
            for token, _ in s.logit_bias:
                if token >= n_vocab:
                    lib.llama_sampler_free(chain)
                    raise ValueError(
                        f"logit_bias names token {token}; this model's tokens are 0 to "
                        f"{n_vocab - 1}"
                    )
            biases = (lib.llama_logit_bias * len(s.logit_bias))(
                *(lib.llama_logit_bias(t, b) for t, b in s.logit_bias)
            )
            parts.append(lib.llama_sampler_init_logit_bias(n_vocab, len(s.logit_bias), biases))
        if s.repeat_penalty != 1 or s.frequency_penalty or s.presence_penalty:
            parts.append(
                lib.llama_sampler_init_penalties(
                    self.llama.n_vocab,
                    s.repeat_last_n,
                    s.repeat_penalty,
                    s.frequency_penalty,
                    s.presence_penalty,
                )
            )
        if s.greedy:
            parts.append(lib.llama_sampler_init_greedy())
        else:
            seed = s.seed if s.seed is not None else lib.LLAMA_DEFAULT_SEED
            parts.append(lib.llama_sampler_init_top_k(s.top_k))
            parts.append(lib.llama_sampler_init_top_p(s.top_p, 1))
            if s.min_p > 0:
                parts.append(lib.llama_sampler_init_min_p(s.min_p, 1))
            parts.append(lib.llama_sampler_init_temp(s.temperature))
            parts.append(lib.llama_sampler_init_dist(seed))
        for part in parts:
            lib.llama_sampler_chain_add(chain, part)
        return chain

    def pick(self, index: int) -> int | None:
        """The next token; None when the grammar admits none (the output cannot go on)."""
        if self.grammar is None:
            return self.llama.sample(self.chain, index)  # the chain accepts the token itself
        logits = self.llama.logits(index)
        if self.chain is None:
            token = int(logits.argmax())
        else:
            token = self._apply(self.chain, self._candidates(logits))
        if not self._allowed(token, float(logits[token])):
            self.rejections += 1
            token = self._pick_from_shortlist(logits) if self.shortlist else None
            if token is None:
                token = self._pick_from_all(logits)
                if token is None:
                    return None  # nothing fits: the grammar is stuck
        if self.chain is not None:
            self.lib.llama_sampler_accept(self.chain, token)
        if not self.llama.is_end_of_generation(token):
            self.lib.llama_sampler_accept(self.grammar, token)
        return token

    def _pick_from_shortlist(self, logits: numpy.ndarray) -> int | None:
        """After a rejection: the grammar over the SHORTLIST likeliest tokens only, when
        that picks what the whole vocabulary would (None: it cannot tell). Greedy: the
        likeliest token that fits, if one of them does. Sampling without bias or penalties:
        top-k keeps the k likeliest tokens that fit, so if k of them are in the shortlist
        the draw is the same. Filtering all 262,144 of Gemma 3's tokens took 40 ms a time
        here, about 11 % of a JSON answer's decoding; the shortlist, 1-2 ms."""
        top = numpy.argpartition(logits, -SHORTLIST)[-SHORTLIST:]
        top = top[numpy.argsort(logits[top])[::-1]]
        few = self._few
        few["id"], few["logit"], few["p"] = top, logits[top], 0
        self._apply(self.grammar, few)
        fits = few["logit"] > -numpy.inf
        if self.chain is None:
            return int(few["id"][int(fits.argmax())]) if fits.any() else None
        if int(fits.sum()) < self.top_k:
            return None
        token = self._apply(self.chain, few)
        return token if token >= 0 else None

    def _pick_from_all(self, logits: numpy.ndarray) -> int | None:
        """After a rejection: the grammar over the whole vocabulary, then the chain over
        what is left (common/sampling.cpp's resampling); None if no token fits."""
        candidates = self._candidates(logits)
        self._apply(self.grammar, candidates)
        fits = candidates["logit"] > -numpy.inf
        if not fits.any():
            return None
        best = int(candidates["id"][int(candidates["logit"].argmax())])
        if self.chain is None:
            return best
        token = self._apply(self.chain, candidates)
        if token < 0 or not self._allowed(token, 0.0):  # top-k/p kept none that fit
            return best
        return token

    def _candidates(self, logits: numpy.ndarray) -> numpy.ndarray:
        """Every token with its logit, as llama.cpp's samplers take them."""
        candidates = self.llama.candidates
        candidates["id"] = self.llama.token_ids
        candidates["logit"] = logits
        candidates["p"] = 0
        return candidates

    def _apply(self, sampler, candidates: numpy.ndarray) -> int:
        """Run `sampler` over the candidates in place; the token it selected (if any)."""
        lib = self.lib
        array = lib.llama_token_data_array(
            candidates.ctypes.data_as(lib.llama_token_data_p), len(candidates), -1, False
        )
        lib.llama_sampler_apply(sampler, ctypes.byref(array))
        if array.selected < 0:
            return -1
        # A sampler may point `data` elsewhere (llama.h); read the selection through it.
        return int(array.data[array.selected].id)

    def _allowed(self, token: int, logit: float) -> bool:
        one = self._one
        one["id"][0], one["logit"][0], one["p"][0] = token, logit, 0
        self._one_array.size, self._one_array.selected = 1, -1
        self.lib.llama_sampler_apply(self.grammar, ctypes.byref(self._one_array))
        return not math.isinf(float(one["logit"][0]))

    def close(self) -> None:
        for sampler in (self.chain, self.grammar):
            if sampler:
                self.llama.free_sampler(sampler)
        self.chain = self.grammar = None
