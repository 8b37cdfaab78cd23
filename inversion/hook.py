"""New words for a frozen text encoder: placeholder tokens and their learned vectors.

The "hook" is an argument, not a PyTorch hook: the text encoder's embedding lookup takes a
mapping {token id: vector} and splices those vectors in (nothing is registered or patched).

A placeholder such as `<cat-toy>` is added to the tokenizer as one new token. Its vector
lives here, in a separate fp32 parameter; the text encoder splices it into the token
embedding lookup (`CLIPTextEmbeddings(new_embeddings=...)`), so the frozen table is never
resized or written and gets no gradient.

A word can have several vectors (the paper's "extended latent"): `<x>` with 3 vectors is
the tokens `<x> <x>_1 <x>_2`, and every prompt is expanded the same way before tokenizing
(the convention of diffusers' `load_textual_inversion`).
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence

import torch
from torch import nn


def sub_tokens(word: str, n: int) -> List[str]:
    """The tokens of a word with n vectors: `<x>`, `<x>_1`, ..., `<x>_{n-1}`."""
    return [word] + [f"{word}_{i}" for i in range(1, n)]


class LearnedEmbeddings(nn.Module):
    """Placeholder words -> vectors, plus the tokenizer that knows them.

    `vectors[i]` is a (n_i, D) parameter for `words[i]`; `trainable` decides requires_grad."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.words: List[str] = []
        self.vectors = nn.ParameterList()

    def add(self, word: str, vectors: torch.Tensor, trainable: bool = False) -> List[int]:
        """Register `word` with its (n, D) vectors; returns the new token ids."""
        if word in self.words:
            raise ValueError(f"the word {word!r} is already defined")
        vectors = vectors.detach().float().reshape(-1, vectors.shape[-1]).clone()
        ids = [self.tokenizer.add_token(t) for t in sub_tokens(word, len(vectors))]
        self.words.append(word)
        self.vectors.append(nn.Parameter(vectors, requires_grad=trainable))
        return ids

    def token_ids(self, word: str) -> List[int]:
        n = len(self.vectors[self.words.index(word)])
        return [self.tokenizer.added_tokens[t] for t in sub_tokens(word, n)]

    def expand(self, prompt: str) -> str:
        """Write every multi-vector word as its sub-tokens: "a <x>" -> "a <x> <x>_1 <x>_2".

        One pass over the prompt that finds the added tokens as the tokenizer does, longest
        first, so that `<cat>` inside `<cat>-toy`, or a sub-token `<x>_1` written out, is left as is."""
        expanded = {word: " ".join(sub_tokens(word, len(vec)))
                    for word, vec in zip(self.words, self.vectors) if len(vec) > 1}
        if not expanded:
            return prompt
        tokens = sorted(self.tokenizer.added_tokens, key=len, reverse=True)
        pattern = "|".join(map(re.escape, tokens))
        return re.sub(pattern, lambda m: expanded.get(m.group(), m.group()), prompt)

    def ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, 77) of the prompts, with the learned words expanded."""
        return self.tokenizer([self.expand(p) for p in prompts])

    def mapping(self) -> Dict[int, torch.Tensor]:
        """{token id: vector (D,)} for `text_encoder(ids, new_embeddings=...)`; rows keep their gradient."""
        out = {}
        for word, vec in zip(self.words, self.vectors):
            for token_id, row in zip(self.token_ids(word), vec):
                out[token_id] = row
        return out

    def state(self) -> Dict[str, torch.Tensor]:
        """{word: (n, D) tensor}, detached: what gets saved."""
        return {w: v.detach().clone() for w, v in zip(self.words, self.vectors)}
