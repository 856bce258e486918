"""Open-Vocabulary SAM in pure PyTorch: segment and name objects from box or point prompts.

    import ovsam
    model = ovsam.load_model("coco_rn50x16")              # or "tiny", a preset .json, a model directory
    predictor = ovsam.Predictor(model, ovsam.Vocabulary.from_spec("coco"))
    predictor.set_image(rgb_uint8)                        # one image embedding ...
    prediction = predictor.predict(boxes=boxes_xyxy)      # ... many prompts
"""

import importlib

# The module of each public name, imported on first use: a process that needs only the light modules (image
# decoding, URL redaction, configs: the pipeline's input, decode and writer workers) then never imports
# open_clip, segment_anything and torchvision (3 s of CPU per process, paid by every such Ray worker of a run).
_HOMES = {
    "AutomaticConfig": "config", "OVSAMConfig": "config", "load_config": "config", "preset_names": "config",
    "OVSAMError": "errors", "PromptError": "errors", "VocabularyError": "errors", "WeightsError": "errors",
    "AutomaticLabeller": "automatic",
    "OVSAM": "model", "build_model": "model", "load_model": "model", "release_state_dicts": "model",
    "save_model": "model",
    "Prediction": "predictor", "Predictor": "predictor",
    "Vocabulary": "vocabulary", "embed_vocabulary": "vocabulary",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    else:  # a submodule, e.g. `ovsam.config` after a bare `import ovsam`
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
