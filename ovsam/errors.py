"""Errors the ``ovsam`` package raises for bad input; each message is meant to be shown to a user as is."""

from __future__ import annotations


class OVSAMError(Exception):
    """Base class of every error ``ovsam`` raises on purpose (bad weights, prompts or vocabularies)."""


class WeightsError(OVSAMError):
    """A checkpoint is missing, unreachable, unreadable, unsafe or does not fit the model."""


class PromptError(OVSAMError):
    """A box or point prompt is invalid for the image it is applied to (e.g. outside the image)."""


class VocabularyError(OVSAMError):
    """A class vocabulary is empty, has duplicate or empty classes, or its file cannot be read."""
