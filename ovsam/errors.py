"""Errors the ``ovsam`` package raises for bad input; each message is meant to be shown to a user as is."""

from __future__ import annotations


class OVSAMError(Exception):
    """Base class of every error ``ovsam`` raises on purpose (bad weights, prompts or vocabularies)."""


class WeightsError(OVSAMError):
    """A checkpoint is missing, unreachable, unreadable, unsafe or does not fit the model."""


class PromptError(OVSAMError):
    """A box or point prompt is invalid for the image it is applied to.

    `kind` says which way, for tables of errors: "prompt_outside_image" or "invalid_prompt".
    """

    OUTSIDE_IMAGE = "prompt_outside_image"
    INVALID = "invalid_prompt"

    def __init__(self, message: str, kind: str = INVALID) -> None:
        super().__init__(message)
        self.kind = kind


class VocabularyError(OVSAMError):
    """A class vocabulary is empty, has duplicate or empty classes, or its file cannot be read."""
