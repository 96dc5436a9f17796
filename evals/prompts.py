"""Prompt templates: ``str.format`` templates with named fields, one per benchmark family.

A template turns a benchmark record into :attr:`ttscale.types.Problem.prompt` (the text before
any chat template). Literal braces are doubled (``\\boxed{{}}``).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ttscale.errors import ConfigError

__all__ = [
    "AIME",
    "ARITH",
    "CUSTOM",
    "GSM8K",
    "HUMANEVAL",
    "MATH",
    "MBPP",
    "PromptTemplate",
]


@dataclass(frozen=True)
class PromptTemplate:
    """A named ``str.format`` template; :attr:`fields` are the names it needs."""

    name: str
    template: str

    @property
    def fields(self) -> tuple[str, ...]:
        names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
        return tuple(dict.fromkeys(names))

    def render(self, values: Mapping[str, Any] | None = None, /, **kwargs: Any) -> str:
        """The template filled with ``values`` and ``kwargs``; a missing field is a ConfigError."""
        merged = {**(values or {}), **kwargs}
        missing = [f for f in self.fields if f not in merged]
        if missing:
            raise ConfigError(
                f"prompt template {self.name!r} needs field(s) {missing}, got {sorted(merged)}"
            )
        return self.template.format(**merged)


#: The bundled task: the question and a newline; the model writes ``a op b = c`` lines and ``#### x``.
ARITH = PromptTemplate("arith", "{question}\n")

_BOXED = "Please reason step by step, and put your final answer within \\boxed{{}}."

#: GSM8K, zero-shot chain of thought with a boxed final answer (read by the math verifier).
GSM8K = PromptTemplate("gsm8k", "{question}\n" + _BOXED)

#: MATH / MATH-500 (and AIME): the problem statement and the boxed-answer instruction.
MATH = PromptTemplate("math", "{problem}\n" + _BOXED)
AIME = PromptTemplate("aime", "{problem}\n" + _BOXED)

#: HumanEval, completion style as in the original paper: the model continues the function.
HUMANEVAL = PromptTemplate("humaneval", "{prompt}")

#: MBPP: the task text and its test asserts; the model answers with a fenced Python block.
MBPP = PromptTemplate(
    "mbpp",
    "You are an expert Python programmer, and here is your task: {text}\n"
    "Your code should pass these tests:\n\n{tests}\n\n"
    "Write the function in a single ```python code block.\n",
)

#: Custom files: the mapped ``prompt`` field, used as is.
CUSTOM = PromptTemplate("custom", "{prompt}")
