"""Open-Vocabulary SAM in pure PyTorch: segment and name objects from box or point prompts.

    import ovsam
    model = ovsam.load_model("coco_rn50x16")              # or "tiny", a preset .json, a model directory
    predictor = ovsam.Predictor(model, ovsam.Vocabulary.from_spec("coco"))
    predictor.set_image(rgb_uint8)                        # one image embedding ...
    prediction = predictor.predict(boxes=boxes_xyxy)      # ... many prompts
"""

from .config import OVSAMConfig, load_config, preset_names
from .errors import OVSAMError, PromptError, VocabularyError, WeightsError
from .automatic import AutomaticConfig, AutomaticLabeller
from .model import OVSAM, build_model, load_model, release_state_dicts, save_model
from .predictor import Prediction, Predictor
from .vocabulary import Vocabulary, embed_vocabulary

__all__ = [
    "AutomaticConfig", "AutomaticLabeller", "Prediction", "Predictor",
    "OVSAM", "OVSAMConfig", "OVSAMError", "PromptError", "Vocabulary", "VocabularyError", "WeightsError",
    "build_model", "embed_vocabulary", "load_config", "load_model", "preset_names", "release_state_dicts",
    "save_model",
]
