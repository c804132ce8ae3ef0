"""Question policies: where a passage's questions come from, how they are split into
reward and probe questions, and how a question is put to the model."""

from __future__ import annotations


def answer_prompt(question: str, title: str | None = None, context: str | None = None) -> str:
    """The user message that asks a question: closed book (title as topic) or open book."""
    if context:
        head = f"Read this passage{f' about {title}' if title else ''}:\n{context}\n\n"
        return f"{head}Answer the question in a few words, using the passage.\nQuestion: {question}"
    topic = f"Topic: {title}\n" if title else ""
    return f"{topic}Answer the question in a few words.\nQuestion: {question}"
