"""protocol/messages.py's estimates, on their own."""

from __future__ import annotations


def test_estimate_prompt_tokens():
    from llmsup.protocol.messages import Chat, Complete, Message, Tokenize, estimate_prompt_tokens

    # UTF-8 bytes / 4, plus 1 (so that no prompt counts as 0).
    assert estimate_prompt_tokens(Complete("")) == 1
    assert estimate_prompt_tokens(Complete("abc")) == 1
    assert estimate_prompt_tokens(Complete("abcd")) == 2
    assert estimate_prompt_tokens(Complete("x" * 400)) == 101
    assert estimate_prompt_tokens(Complete("é" * 4)) == 3, "bytes, not characters"
    # Chat: each message's content plus 8 bytes for its turn markers.
    chat = Chat((Message("user", "x" * 12), Message("assistant", "")))
    assert estimate_prompt_tokens(chat) == (12 + 8 + 0 + 8) // 4 + 1
    assert estimate_prompt_tokens(Tokenize("x" * 40)) == 11
