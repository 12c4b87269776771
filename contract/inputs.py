"""The pydantic half of alignd's input policy: one base for every model that validates what a client sent.

``service/api/input_policy.py`` is the edge half (no NUL or unpaired surrogate in any string of a request, no
NaN or Infinity in a JSON body). This base makes the request models (``service/api/schemas.py``, the graders
route) and the contract's (every ``*Hyperparameters`` model, LoRA settings, grader specs) refuse:

- unknown fields (``extra="forbid"``);
- what pydantic's lax mode would coerce (``strict=True``): an int field takes an int, not ``true``, ``"3"`` or
  ``3.0``; a bool field takes a bool, not ``1`` or ``"yes"``; a float field an int or a float, not a string
  or a bool. Form fields are strings by nature and are not models: FastAPI parses them from strings;
- a float that is not finite (``allow_inf_nan=False``): JSON has no NaN or Infinity, so a value that is one
  came from a Python caller or an overflow, and a JSON column would store it as invalid JSON.

Strict mode also wants an Enum member, not its value, in Python input (what FastAPI validates a parsed body
as), so an Enum field says ``Field(strict=False)``; an enum's values are strings, with nothing to coerce.
A subclass's own ``model_config`` is merged with this one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class InputModel(BaseModel):
    """Base of every model that validates client input; see the module docstring."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
